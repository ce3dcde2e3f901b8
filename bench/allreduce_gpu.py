"""Latency of one tensor-parallel sum at decode sizes: NCCL vs dsinfer's NVLink one-shot kernel
(dsinfer.fast_allreduce), both captured in a CUDA graph of 64 back-to-back sums (a Llama-7B
decode step has 64), replayed; microseconds per sum. One JSON line per size from rank 0.

    dsinfer --num_gpus 2 bench/allreduce_gpu.py [--sizes 4096,32768,131072] [--dtype fp16]
"""
import argparse
import json
import os

import torch
import torch.distributed as dist

os.environ.setdefault("DSINFER_FAST_ALLREDUCE", "1")    # the kernel under test is opt-in

from dsinfer.engine import init_group
from dsinfer.fast_allreduce import NVLinkAllReduce

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def graph_us(fn, x, calls: int = 64, reps: int = 20) -> float:
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn(x)
    graph.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    dist.barrier()
    a.record()
    for _ in range(reps):
        graph.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e3 / (reps * calls)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="4096,32768,131072", help="elements per sum")
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    tp = init_group(int(os.environ.get("WORLD_SIZE", "1")))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    fast = NVLinkAllReduce.create(tp, device)

    def nccl(x):
        dist.all_reduce(x)
        return x
    for n in map(int, a.sizes.split(",")):
        x = torch.randn(n, device=device).to(DTYPES[a.dtype])
        row = {"what": "allreduce", "elements": n, "bytes": n * x.element_size(),
               "world": tp.size, "device": torch.cuda.get_device_name(),
               "nccl_us": round(graph_us(nccl, x), 2)}
        if fast is not None and fast.fits(x):
            row["one_shot_us"] = round(graph_us(fast, x), 2)
        if tp.rank == 0:
            print(json.dumps(row), flush=True)
    dist.barrier()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
