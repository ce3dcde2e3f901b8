"""Tensor-parallel sums on this host's GPUs, by size: NCCL (eager and inside a CUDA graph)
and dsinfer's NVLink one-shot kernel (dsinfer.fast_allreduce, where the size fits its
buffer), from a decode step's 8 KB to a 512-token prefill's 4 MB (Llama-7B). A sum timed
here alone against the same sum inside a model's forward tells the link's cost from the time
a rank waits for the other.

    dsinfer --num_gpus 2 bench/allreduce_gpu.py [--sizes-kb 8,256,4096] [--dtype fp16]

Rank 0 prints one JSON line per (what, size) and appends it to $OUT/allreduce.jsonl: us per
call (mean over --reps calls issued back to back) and the algorithm bandwidth (bytes / time).
"""
import argparse
import json
import os
import subprocess
import sys

import torch
import torch.distributed as dist

os.environ.setdefault("DSINFER_FAST_ALLREDUCE", "1")    # the kernel under test is opt-in

from dsinfer.engine import init_group
from dsinfer.fast_allreduce import NVLinkAllReduce

OUT = os.environ.get("OUT") or "."
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def record(rank: int, **kw) -> None:
    if rank:
        return
    kw.update(device=torch.cuda.get_device_name(), world_size=dist.get_world_size())
    line = json.dumps(kw)
    print(line, flush=True)
    with open(os.path.join(OUT, "allreduce.jsonl"), "a") as f:
        f.write(line + "\n")


def per_call_us(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e3 / reps


def in_graph(fn, calls: int):
    """A graph of `calls` calls of fn; returns its replay (one replay = `calls` calls)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return g.replay


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes-kb", default="8,64,256,1024,4096,16384")
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    tp = init_group(int(os.environ.get("WORLD_SIZE", "1")))
    device = torch.device("cuda", torch.cuda.current_device())
    if tp.rank == 0:
        env = {k: v for k, v in os.environ.items() if k.startswith("NCCL")}
        topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True).stdout
        record(0, what="env", nccl_env=env, nccl=".".join(map(str, torch.cuda.nccl.version())),
               topo=topo.splitlines()[:4])
    fast = NVLinkAllReduce.create(tp, device)
    for kb in map(int, a.sizes_kb.split(",")):
        dtype = DTYPES[a.dtype]
        x = torch.randn(kb * 1024 // dtype.itemsize, device=device).to(dtype)   # kb KiB
        nbytes = x.numel() * x.element_size()
        row = dict(size_kb=kb, dtype=a.dtype)

        def nccl():
            dist.all_reduce(x, group=tp.group)
        us = per_call_us(nccl, a.reps)
        record(tp.rank, what="nccl_eager", us=round(us, 2), GBps=round(nbytes / us / 1e3, 1), **row)
        replay = in_graph(nccl, 10)
        us = per_call_us(replay, max(1, a.reps // 10)) / 10
        record(tp.rank, what="nccl_graph", us=round(us, 2), GBps=round(nbytes / us / 1e3, 1), **row)
        if fast is not None and fast.fits(x):
            replay = in_graph(lambda: fast(x), 10)
            us = per_call_us(replay, max(1, a.reps // 10)) / 10
            record(tp.rank, what="oneshot_graph", us=round(us, 2),
                   GBps=round(nbytes / us / 1e3, 1), **row)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
