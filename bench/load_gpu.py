"""Load time of a pre-sharded fp16 checkpoint to ready-on-GPU, beside HF and raw safetensors.

usage: python3 bench/load_gpu.py SECTION... [--model neo|llama] [--nproc N] [--workdir DIR]
  make         write a random fp16 HF checkpoint of the model's shape (GPT-Neo-2.7B, 5.3 GB, or
               Llama-7B, 13.5 GB) and reshard it to TP 1 and 2
  hf           transformers from_pretrained(dtype=fp16, device_map="cuda")
  hf_tp        transformers from_pretrained(dtype=fp16, tp_plan="auto") under torchrun --nproc
               (HF's own tensor-parallel loading; time = slowest rank)
  raw          safetensors.torch.load_file(device="cuda") of every shard
  dsinfer      meta-device model + dsinfer.init_inference(checkpoint=<TP nproc dsinfer folder>)
  comm         under torchrun --nproc: init_process_group and the first NCCL collective alone
               (what a TP load pays for the group; no files)
  check        dsinfer's model vs HF's on one input (max rel. logit difference)
  io           this host's limits: page-cache read GB/s (1 and 8 threads), pinning 256 MB,
               pinned host-to-device GB/s
Timed sections run in a fresh subprocess twice (the second with a warm page cache); only the
load call is timed (imports, interpreter start and CUDA context creation are not, for every
section alike). Results: JSON lines.
Under torchrun with WORLD_SIZE 2, `dsinfer` loads the TP 2 folder (time = slowest rank).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

NEO = dict(hidden_size=2560, num_layers=32, num_heads=20, vocab_size=50257,
           max_position_embeddings=2048, attention_types=[[["global", "local"], 16]],
           window_size=256, intermediate_size=None)
LLAMA = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
MODEL = os.environ.get("DSINFER_BENCH_MODEL", "neo")     # set by --model, read by children
PHASES: dict = {}       # engine.load_seconds of a dsinfer section (printed with its time)


def _config():
    import transformers as tf
    if MODEL == "llama":
        return tf.LlamaConfig(**LLAMA, torch_dtype="float16")
    return tf.GPTNeoConfig(**NEO, torch_dtype="float16")


def make(work: Path) -> None:
    import transformers as tf
    from dsinfer.reshard import reshard
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(_config())
    hf = work / f"{MODEL}-hf"
    if not (hf / "config.json").exists():
        g = torch.Generator(device="cuda").manual_seed(0)
        with torch.device("cuda"):
            model = model.to_empty(device="cuda").half()
            for p in model.parameters():
                p.data.normal_(0, 0.02, generator=g)
        t = time.perf_counter()
        model.save_pretrained(hf, max_shard_size="10GB")
        print(json.dumps({"section": "make", "model": MODEL,
                          "write_s": time.perf_counter() - t}))
        del model
    for tp in (1, 2):
        if not (work / f"{MODEL}-tp{tp}" / "dsinfer.json").exists():
            res = reshard(hf, work / f"{MODEL}-tp{tp}", tp=tp, progress=False)
            print(json.dumps({"section": f"reshard-tp{tp}", "seconds": res.seconds,
                              "bytes": res.bytes}))


def _sync():
    torch.cuda.synchronize()


def load_hf(work: Path) -> float:
    import transformers as tf
    t = time.perf_counter()
    tf.AutoModelForCausalLM.from_pretrained(work / f"{MODEL}-hf", dtype=torch.float16,
                                            device_map="cuda")
    _sync()
    return time.perf_counter() - t


def load_hf_tp(work: Path) -> float:
    import torch.distributed as dist
    import transformers as tf
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    t = time.perf_counter()
    tf.AutoModelForCausalLM.from_pretrained(work / f"{MODEL}-hf", dtype=torch.float16,
                                            tp_plan="auto")
    _sync()
    secs = time.perf_counter() - t
    if dist.is_initialized():
        dist.barrier()
    return secs


def comm_setup(work: Path) -> float:
    """What a TP load pays for the process group alone: init_process_group (rendezvous) and
    the first collective, which creates the NCCL communicator; no files are read."""
    import datetime
    import torch.distributed as dist
    t = time.perf_counter()
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=120))
    group = time.perf_counter() - t
    flag = torch.zeros(1, device="cuda")
    dist.broadcast(flag, src=0)
    _sync()
    secs = time.perf_counter() - t
    PHASES.update(group=round(group, 4), first_collective=round(secs - group, 4))
    t2 = time.perf_counter()
    dist.broadcast(flag, src=0)
    _sync()
    PHASES["second_collective"] = round(time.perf_counter() - t2, 5)
    dist.destroy_process_group()
    return secs


def load_raw(work: Path) -> float:
    from safetensors.torch import load_file
    t = time.perf_counter()
    for f in sorted((work / f"{MODEL}-hf").glob("*.safetensors")):
        load_file(f, device="cuda")
    _sync()
    return time.perf_counter() - t


def load_dsinfer(work: Path) -> float:
    import transformers as tf
    import dsinfer
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ckpt = work / f"{MODEL}-tp{world}"
    cfg = tf.AutoConfig.from_pretrained(ckpt)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg)
    t = time.perf_counter()
    eng = dsinfer.init_inference(model, tensor_parallel={"tp_size": world},
                                 checkpoint=str(ckpt), dtype=torch.float16)
    _sync()
    PHASES.update(eng.load_seconds)
    return time.perf_counter() - t


def io_limits(work: Path) -> dict:
    """What bounds a load on this host: page-cache read rate with 1 and 8 threads (pread into
    plain memory), pinning 256 MB, and pinned host-to-device copy rate."""
    import concurrent.futures as cf
    import numpy as np
    files = sorted((work / f"{MODEL}-tp1").rglob("*.safetensors"))
    out = {}
    for threads in (1, 8):
        chunk = 16 << 20
        jobs = [(f, off) for f in files for off in range(0, f.stat().st_size, chunk)]
        bufs = {}

        def read(job):
            f, off = job
            buf = bufs.setdefault(threading.get_ident(), np.empty(chunk, np.uint8))
            with open(f, "rb", buffering=0) as fh:
                return os.preadv(fh.fileno(), [memoryview(buf)], off)
        t = time.perf_counter()
        with cf.ThreadPoolExecutor(threads) as pool:
            n = sum(pool.map(read, jobs))
        out[f"page_cache_GBps_{threads}t"] = round(n / (time.perf_counter() - t) / 1e9, 2)
    t = time.perf_counter()
    pinned = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    out["pin_256MB_s"] = round(time.perf_counter() - t, 4)
    dev = torch.empty_like(pinned, device="cuda")
    dev.copy_(pinned, non_blocking=True)
    _sync()
    t = time.perf_counter()
    for _ in range(8):
        dev.copy_(pinned, non_blocking=True)
    _sync()
    out["h2d_pinned_GBps"] = round(8 * pinned.numel() / (time.perf_counter() - t) / 1e9, 2)
    return out


def check(work: Path) -> dict:
    import transformers as tf
    import dsinfer
    ref = tf.AutoModelForCausalLM.from_pretrained(work / f"{MODEL}-hf", dtype=torch.float16,
                                                  device_map="cuda").eval()
    cfg = tf.AutoConfig.from_pretrained(work / f"{MODEL}-tp1")
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg)
    eng = dsinfer.init_inference(model, checkpoint=str(work / f"{MODEL}-tp1"),
                                 dtype=torch.float16)
    ids = torch.randint(0, cfg.vocab_size, (1, 32), device="cuda")
    with torch.no_grad():
        a, b = ref(ids).logits.float(), eng.module(ids).logits.float()
    same = torch.equal(ref.generate(ids, max_new_tokens=8, do_sample=False),
                       eng.module.generate(ids, max_new_tokens=8, do_sample=False))
    return {"rel_err": ((a - b).abs().max() / a.abs().max()).item(), "generate_same": same}


TIMED = {"hf": load_hf, "hf_tp": load_hf_tp, "raw": load_raw, "dsinfer": load_dsinfer,
         "comm": comm_setup}
DISTRIBUTED = ("dsinfer", "hf_tp", "comm")      # sections that run under torchrun with --nproc ranks


def _start_together(work: Path) -> None:
    """Under torchrun every rank starts its clock at the same moment (a file barrier, outside
    torch.distributed): otherwise a rank whose interpreter started first counts the wait for
    the others' imports in its load time."""
    world, run = int(os.environ.get("WORLD_SIZE", "1")), os.environ.get("DSINFER_BENCH_RUN")
    if world == 1 or not run:
        return
    folder = work / f".start-{run}"
    folder.mkdir(exist_ok=True)
    (folder / os.environ.get("RANK", "0")).touch()
    while len(list(folder.iterdir())) < world:
        time.sleep(0.001)


def child(section: str, work: Path) -> None:
    if section in ("check", "io"):
        print(json.dumps({"section": section, **(check(work) if section == "check"
                                                   else io_limits(work))}))
        return
    # CUDA context up before the clock starts, for every section, on the rank's own GPU (under
    # torchrun, rank r's context on GPU 0 would leave its real one to be made inside the clock)
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    _start_together(work)
    secs = TIMED[section](work)
    rank = int(os.environ.get("RANK", "0"))
    print(json.dumps({"section": section, "model": MODEL, "rank": rank, "world": int(
        os.environ.get("WORLD_SIZE", "1")), "seconds": round(secs, 3),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "DSINFER_"))
                and k != "DSINFER_BENCH_MODEL"},
        **({"phases": PHASES} if PHASES else {})}), flush=True)


def _json_or_none(line: str):
    """A child's result line (other output, e.g. a library's printed dict, is skipped)."""
    try:
        d = json.loads(line) if line.startswith("{") else None
    except ValueError:
        return None
    return d if isinstance(d, dict) and "section" in d else None


def main() -> int:
    global MODEL
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sections", nargs="+")
    p.add_argument("--workdir", default="/tmp/dsinfer-bench")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--nproc", type=int, default=1, help="ranks for the dsinfer and hf_tp sections")
    p.add_argument("--model", choices=("neo", "llama"), default=MODEL)
    args = p.parse_args()
    os.environ["DSINFER_BENCH_MODEL"] = MODEL = args.model
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args.sections[0], work)
        return 0
    for s in args.sections:
        if s in ("make", "make-neo"):
            make(work)
            continue
        for attempt in ("cold-ish", "warm"):
            cmd = [sys.executable, __file__, s, "--workdir", str(work), "--child"]
            if s in DISTRIBUTED and args.nproc > 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                       str(args.nproc), *cmd[1:]]
            env = {**os.environ, "DSINFER_BENCH_RUN": f"{os.getpid()}-{s}-{attempt}-{time.time()}"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [d for d in map(_json_or_none, out.stdout.splitlines()) if d]
            if out.returncode or not lines:
                tail = [ln for ln in out.stderr.splitlines() if "it/s]" not in ln][-12:]
                print(json.dumps({"section": s, "error": "\n".join(tail), "rc": out.returncode,
                                  "results": lines}), flush=True)
                break
            secs = max(ln.get("seconds", 0) for ln in lines)
            if len(lines) > 1:
                lines[0]["phases"] = [ln.get("phases") for ln in lines]   # every rank's
            print(json.dumps({**lines[0], "attempt": attempt, "seconds": secs,
                              "nproc": args.nproc if s in DISTRIBUTED else 1}), flush=True)
            if s in ("check", "io"):
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
