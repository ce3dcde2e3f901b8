"""CPU benchmark of `dsinfer-quantize` (issue 3): throughput in MB/s of fp16 input and peak RSS
against the reshard bound (2 x largest tensor + interpreter baseline + 150 MB).

usage: python bench/quantize_cpu.py [--size-gb 1.6] [--repeat 2] [--no-results]
Reuses reshard_cpu.py's generated Llama-shaped checkpoint and measuring helpers."""
from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import tempfile
from pathlib import Path

import reshard_cpu as rc

RESULTS = Path(__file__).with_name("RESULTS.md")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size-gb", type=float, default=1.6)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dsinfer-qbench-"))
    try:
        layers = rc.layers_for(args.size_gb * 1e9, rc.SHAPE)
        size = rc.write_checkpoint(work / "hf", layers, rc.SHAPE)
        largest = max(rc.nbytes(s) for _, s in rc.model_tensors(layers, rc.SHAPE))
        base = rc.measure("baseline", [sys.executable, "-c", rc.BASELINE_IMPORTS], 1)
        limit = 2 * largest + base.rss + 150e6
        lines = []
        for groups, tp in (("per-channel", 1), ("64", 4)):
            out = work / f"q-{groups}-{tp}"
            cmd = [rc.cli("dsinfer-quantize"), str(work / "hf"), "--out", str(out), "--groups",
                   groups, "--mlp-extra-grouping", "--tp", str(tp), "--quiet"]
            r = rc.measure(f"quantize --groups {groups} --tp {tp}", cmd, args.repeat,
                           before=rc.rmtree(out))
            mbs = size / 1e6 / r.wall_s
            ok = "pass" if r.rss <= limit else "FAIL"
            lines.append(f"| {r.label} | {r.wall_s:.2f} | {mbs:.0f} | {r.cpu_s:.2f} | "
                         f"{r.rss / 1e6:.0f} | {ok} |")
        text = "\n".join([
            f"\n## dsinfer-quantize, {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC",
            f"- machine: {rc.machine()}",
            f"- checkpoint: Llama-shaped fp16, {layers} layers, {size / 1e9:.3f} GB; largest "
            f"tensor {largest / 1e6:.1f} MB; baseline RSS {base.rss / 1e6:.0f} MB; "
            f"limit {limit / 1e6:.0f} MB; best of {args.repeat}",
            "", "| run | wall s | MB/s of input | CPU s | peak RSS MB | RSS <= limit |",
            "|---|---:|---:|---:|---:|---|", *lines, ""])
        print(text)
        if not args.no_results:
            with open(RESULTS, "a") as f:
                f.write(text)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
