#!/usr/bin/env python
"""CPU benchmark of `dsinfer-reshard` (issue 2, acceptance point "Benchmark").

    python bench/reshard_cpu.py [--size-gb 1.6] [--workdir DIR] [--repeat 3] [--keep]

1. Generates a Llama-shaped fp16 HF checkpoint (config.json + model.safetensors with the real
   HF names and shapes) of at least --size-gb GB, one tensor at a time through dsinfer's
   StreamingWriter, so the generator never holds more than one tensor.
2. Measures, each command in a fresh subprocess, wall time and peak RSS:
     cp -r SRC DST            warm page cache (one untimed warm-up copy first); no fsync
     cp -r SRC DST && sync    the same bytes, made durable (dsinfer fsyncs every file it writes)
     interpreter baseline     python importing what the CLI imports, then exiting
     HF -> TP 4               dsinfer-reshard SRC --tp 4 --out DIR --quiet   (the acceptance run)
     TP 4 -> TP 2             dsinfer source
     TP 2 -> TP 1 --to hf     then checked bit-identical with SRC (untimed)
3. Checks the targets: peak RSS <= 2 x largest tensor + baseline + 150 MB; wall time
   <= 1.5 x the warm `cp -r` (hard floor 4x). Prints a table and appends a dated section to
   bench/RESULTS.md. Removes the multi-GB work folder unless --keep.

Units: GB/MB are decimal (1e9/1e6 bytes) everywhere, RSS included.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from dsinfer.formats.safetensors_io import SafetensorsFile, StreamingWriter

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
MB = 1e6
GB = 1e9
RSS_SLACK = 150 * MB          # the "+ 150 MB" of the RSS target
TIME_TARGET, TIME_FLOOR = 1.5, 4.0

# Llama shape (TinyLlama-1.1B's widths); the layer count follows from --size-gb.
SHAPE = dict(hidden=2048, heads=16, kv_heads=8, intermediate=5632, vocab=32000)
DTYPE = torch.float16


# ------------------------------------------------------------------------------ the checkpoint

def layer_tensors(i: int, s: dict) -> List[Tuple[str, Tuple[int, ...]]]:
    h, kv = s["hidden"], s["kv_heads"] * (s["hidden"] // s["heads"])
    p = f"model.layers.{i}."
    return [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (s["intermediate"], h)),
            (p + "mlp.up_proj.weight", (s["intermediate"], h)),
            (p + "mlp.down_proj.weight", (h, s["intermediate"])),
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]


def model_tensors(layers: int, s: dict) -> List[Tuple[str, Tuple[int, ...]]]:
    """HF LlamaForCausalLM names and shapes, untied lm_head, in module order."""
    out = [("model.embed_tokens.weight", (s["vocab"], s["hidden"]))]
    for i in range(layers):
        out += layer_tensors(i, s)
    return out + [("model.norm.weight", (s["hidden"],)),
                  ("lm_head.weight", (s["vocab"], s["hidden"]))]


def nbytes(shape) -> int:
    return math.prod(shape) * DTYPE.itemsize


def layers_for(size_bytes: float, s: dict) -> int:
    fixed = sum(nbytes(sh) for _, sh in model_tensors(0, s))
    per_layer = sum(nbytes(sh) for _, sh in layer_tensors(0, s))
    return max(1, math.ceil((size_bytes - fixed) / per_layer))


def llama_config(layers: int, s: dict) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": s["hidden"], "intermediate_size": s["intermediate"],
            "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"],
            "num_hidden_layers": layers, "vocab_size": s["vocab"], "hidden_act": "silu",
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "torch_dtype": "float16"}


def write_checkpoint(folder: Path, layers: int, s: dict) -> int:
    """Random N(0, 0.02) fp16 weights (ones for norms), streamed: one tensor in memory."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(llama_config(layers, s), indent=2))
    plan = [(n, sh, DTYPE) for n, sh in model_tensors(layers, s)]
    gen = torch.Generator().manual_seed(0)
    w = StreamingWriter(folder / "model.safetensors", plan, metadata={"format": "pt"})
    for name, shape, _ in plan:
        t = (torch.ones(shape) if len(shape) == 1 else
             torch.empty(shape).normal_(0, 0.02, generator=gen)).to(DTYPE)
        w.write(name, t)
    size, _ = w.close()
    return size


# ------------------------------------------------------------------------------ measuring

@dataclasses.dataclass
class Run:
    label: str
    wall_s: float     # best wall time over the repeats
    cpu_s: float      # user + system CPU seconds of that best run (less sensitive to a busy box)
    rss: int          # highest peak resident set size over the repeats, bytes


def _time_v(cmd: List[str]) -> Tuple[float, float, int]:
    """(wall s, user+sys CPU s, peak RSS bytes) of `cmd` run under /usr/bin/time -v."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as rep:
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-v", "-o", rep.name, *cmd],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
        fields = dict(l.strip().rsplit(": ", 1) for l in rep.read().splitlines() if ": " in l)
    cpu = float(fields["User time (seconds)"]) + float(fields["System time (seconds)"])
    return wall, cpu, int(fields["Maximum resident set size (kbytes)"]) * 1024


# Fallback without /usr/bin/time: a fresh wrapper interpreter runs the command and reports
# RUSAGE_CHILDREN.ru_maxrss (KiB on Linux), i.e. the command's peak, not the wrapper's.
_WRAPPER = ("import resource, subprocess, sys\n"
            "rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
            "r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
            "print(r.ru_utime + r.ru_stime, r.ru_maxrss)\n"
            "sys.exit(rc)\n")


def _rusage(cmd: List[str]) -> Tuple[float, float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    cpu, kb = proc.stdout.split()[-2:]
    return wall, float(cpu), int(kb) * 1024


def measure(label: str, cmd: List[str], repeat: int = 1, before=None) -> Run:
    """Best wall time and highest peak RSS over `repeat` fresh runs. `before()` runs untimed
    ahead of each (removing the previous output); `sync` then flushes dirty pages so that
    writeback of earlier steps is not charged to this one."""
    best, rss = (math.inf, 0.0), 0
    for _ in range(repeat):
        if before:
            before()
        os.sync()
        wall, cpu, peak = (_time_v if os.access("/usr/bin/time", os.X_OK) else _rusage)(cmd)
        best, rss = min(best, (wall, cpu)), max(rss, peak)
    return Run(label, best[0], best[1], rss)


def rmtree(*paths: Path):
    return lambda: [shutil.rmtree(p, ignore_errors=True) for p in paths]


def cli(name: str) -> str:
    """The venv's console script next to this interpreter (falls back to PATH)."""
    p = Path(sys.executable).parent / name
    return str(p) if p.exists() else (shutil.which(name) or sys.exit(f"{name} not found"))


# What the CLI imports before it touches data on the runs measured here (HF safetensors and
# dsinfer sources, no cast): its own module only (dsinfer.reshard, formats.bytecopy, the HF and
# dsinfer readers; neither torch nor transformers nor the other readers, which the byte-copy
# path never loads). A smaller baseline makes the RSS limit stricter.
BASELINE_IMPORTS = ("import dsinfer.tools.reshard, sys; "
                    "assert 'torch' not in sys.modules, 'the CLI imports torch'")


# ------------------------------------------------------------------------------ checking

def _tensors(folder: Path) -> Dict[str, SafetensorsFile]:
    """name -> file over every safetensors file of an HF folder (sharded above 5 GB)."""
    return {n: f for f in map(SafetensorsFile, sorted(folder.glob("*.safetensors")))
            for n in f.names()}


def same_tensors(a: Path, b: Path) -> Optional[str]:
    """None if two HF folders hold bit-identical tensors, else the first difference."""
    ta, tb = _tensors(a), _tensors(b)
    if sorted(ta) != sorted(tb):
        return "tensor names differ"
    for n in ta:
        x, y = ta[n].read(n), tb[n].read(n)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.uint8),
                                                                       y.view(torch.uint8)):
            return f"{n} differs"
    return None


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ reporting

def machine() -> Dict[str, str]:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor() or "?")
    mem = next((int(l.split()[1]) * 1024 for l in Path("/proc/meminfo").read_text().splitlines()
                if l.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": str(os.cpu_count()), "ram": f"{mem / GB:.1f} GB",
            "python": platform.python_version(), "torch": torch.__version__,
            "kernel": platform.release()}


def verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def table(runs: List[Run], cp: Run, cp_sync: Run, limit: float) -> List[str]:
    rows = ["| run | wall s | x cp | x (cp+sync) | CPU s | peak RSS MB | RSS ≤ limit "
            "| time ≤ 1.5x cp | ≤ 4x cp |", "|---|---:|---:|---:|---:|---:|---|---|---|"]
    for r in runs:
        ratio = r.wall_s / cp.wall_s
        checks = (f"| {verdict(r.rss <= limit)} | {verdict(ratio <= TIME_TARGET)} "
                  f"| {verdict(ratio <= TIME_FLOOR)} |" if r.label.startswith(("HF", "TP"))
                  else "| | | |")
        rows.append(f"| {r.label} | {r.wall_s:.2f} | {ratio:.2f} | {r.wall_s / cp_sync.wall_s:.2f} "
                    f"| {r.cpu_s:.2f} | {r.rss / MB:.0f} {checks}")
    return rows


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def report(m, shape, layers, src_bytes, largest, baseline, limit, runs, cp, cp_sync, check,
           df_line, load, repeat) -> str:
    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"## {date}", "",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM; Linux {m['kernel']}; "
        f"Python {m['python']}, torch {m['torch']}",
        f"- disk: `{df_line}`",
        f"- model: LlamaForCausalLM, hidden {shape['hidden']}, {shape['heads']} heads, "
        f"{shape['kv_heads']} KV heads, intermediate {shape['intermediate']}, vocab {shape['vocab']}, "
        f"{layers} layers, untied lm_head, fp16",
        f"- checkpoint: model.safetensors {src_bytes / GB:.3f} GB; largest tensor "
        f"{largest / MB:.1f} MB (embed_tokens / lm_head {shape['vocab']}x{shape['hidden']})",
        f"- interpreter baseline RSS: {baseline / MB:.0f} MB (`python -c` importing "
        "dsinfer.tools.reshard, torch-free, then exiting)",
        f"- RSS limit = 2 x {largest / MB:.1f} + {baseline / MB:.0f} + 150 = {limit / MB:.0f} MB",
        f"- time: best of {repeat} runs each, page cache warm, `sync` before each run; ratios "
        f"against warm `cp -r` ({cp.wall_s:.2f} s) and `cp -r && sync` ({cp_sync.wall_s:.2f} s); "
        f"load average before / after: {load[0]} / {load[1]} (other work on the machine inflates "
        "wall times; CPU s is user + system of the best run)",
        "- commands: `dsinfer-reshard SRC --tp 4 --out DIR --quiet`; then the TP 4 output "
        "`--tp 2`; then the TP 2 output `--tp 1 --to hf`",
        f"- TP 2 -> HF round trip bit-identical to the source: {check}", "",
        *table(runs, cp, cp_sync, limit), ""]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ steps

def measure_cp(src: Path, dst: Path, repeat: int) -> Tuple[Run, Run]:
    """The yardstick: `cp -r` of the same folder, page cache warm (one untimed warm-up copy).
    coreutils >= 9 copies in the kernel (copy_file_range), no fsync; `&& sync` makes it durable
    as dsinfer's output is."""
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    cp = measure("cp -r (warm)", ["cp", "-r", str(src), str(dst)], repeat, before=rmtree(dst))
    cp_sync = measure("cp -r && sync", ["sh", "-c", f"cp -r '{src}' '{dst}' && sync"], repeat,
                      before=rmtree(dst))
    rmtree(dst)()
    return cp, cp_sync


def measure_reshards(src: Path, work: Path, repeat: int) -> List[Run]:
    """HF -> TP 4 (the acceptance run), TP 4 -> TP 2, TP 2 -> HF; each output removed before a
    repeat. The source format is detected, as a user's command line would have it."""
    reshard, runs = cli("dsinfer-reshard"), []
    for label, cmd, out in (
            ("HF -> TP 4", [src, "--tp", "4"], "llama-tp4"),
            ("TP 4 -> TP 2", [work / "llama-tp4", "--tp", "2"], "llama-tp2"),
            ("TP 2 -> HF (TP 1)", [work / "llama-tp2", "--tp", "1", "--to", "hf"],
             "llama-hf-back")):
        cmd = [reshard, *map(str, cmd), "--out", str(work / out), "--quiet"]
        runs.append(measure(label, cmd, repeat, before=rmtree(work / out)))
        print(f"  {label}: {runs[-1].wall_s:.2f} s, {runs[-1].rss / MB:.0f} MB "
              f"({du(work / out) / GB:.3f} GB written)")
    return runs


def append_results(text: str) -> None:
    if not RESULTS.exists():
        RESULTS.write_text("# dsinfer-reshard CPU benchmark results\n\n"
                           "Sections appended by `python bench/reshard_cpu.py` (see bench/README.md)."
                           "\n\n")
    with RESULTS.open("a") as f:
        f.write(text)
    print(f"appended to {RESULTS}")


def run_all(args, work: Path, shape: dict, layers: int, df_line: str) -> int:
    src = work / "llama-hf"
    t0 = time.perf_counter()
    src_bytes = write_checkpoint(src, layers, shape)
    print(f"generated {src} ({layers} layers, {src_bytes / GB:.3f} GB) in "
          f"{time.perf_counter() - t0:.1f} s")
    largest = max(nbytes(sh) for _, sh in model_tensors(layers, shape))

    load = [loadavg()]
    cp, cp_sync = measure_cp(src, work / "cp-copy", args.repeat)
    # What the interpreter costs before any tensor is read: the RSS target's "baseline".
    base = measure("baseline (imports)", [sys.executable, "-c", BASELINE_IMPORTS], args.repeat)
    reshards = measure_reshards(src, work, args.repeat)
    load.append(loadavg())
    diff = same_tensors(src, work / "llama-hf-back")

    limit = 2 * largest + base.rss + RSS_SLACK
    text = report(machine(), shape, layers, src_bytes, largest, base.rss, limit,
                  [cp, cp_sync, base, *reshards], cp, cp_sync,
                  "yes" if diff is None else f"NO ({diff})", df_line, load, args.repeat)
    print("\n" + text)
    if not args.no_results:
        append_results(text)
    # Exit status: the acceptance run (HF -> TP 4) within the RSS limit and the hard time floor.
    acc = reshards[0]
    return 0 if acc.rss <= limit and acc.wall_s <= TIME_FLOOR * cp.wall_s and diff is None else 1


# ------------------------------------------------------------------------------ main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.6, help="minimum checkpoint size (1e9 B)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="scratch folder (default: a new folder under $TMPDIR or /tmp)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per command (best kept)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args()

    shape, layers = SHAPE, layers_for(args.size_gb * GB, SHAPE)
    est = sum(nbytes(sh) for _, sh in model_tensors(layers, shape))
    work = Path(tempfile.mkdtemp(prefix="dsinfer-bench-", dir=args.workdir))
    # Source + one cp copy + TP4 + TP2 + HF live at once at most (the cp copy is removed first).
    need = 5 * est + 1 * GB
    free = shutil.disk_usage(work).free
    df_line = subprocess.run(["df", "-h", str(work)], capture_output=True,
                             text=True).stdout.splitlines()[-1]
    print(f"workdir {work}: {free / GB:.1f} GB free, need {need / GB:.1f} GB\n  {df_line}")
    if free < need:
        shutil.rmtree(work)
        sys.exit("not enough disk space; pass --workdir on a larger filesystem")
    try:
        return run_all(args, work, shape, layers, df_line)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            print(f"removed {work}")


if __name__ == "__main__":
    sys.exit(main())
