"""Runs under `dsinfer --num_gpus 2`: the NVLink one-shot all-reduce (dsinfer.fast_allreduce)
against NCCL, eagerly and replayed from a CUDA graph. Writes OUT.rank{r} (JSON)."""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dsinfer.engine import init_group
from dsinfer.fast_allreduce import NVLinkAllReduce


def main():
    out = Path(sys.argv[1])
    tp = init_group(int(os.environ["WORLD_SIZE"]))
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    fast = NVLinkAllReduce.create(tp, device)
    res = {"created": fast is not None, "bad": [], "checked": 0}
    if fast is None:
        out.with_name(f"{out.name}.rank{tp.rank}").write_text(json.dumps(res))
        return
    g = torch.Generator(device=device).manual_seed(1234 + tp.rank)

    def check(x, got, what):
        want = x.clone()
        dist.all_reduce(want)
        tol = 0 if x.dtype == torch.float32 else 1e-2
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()
        res["checked"] += 1
        if err > tol or got.shape != x.shape:
            res["bad"].append([what, str(x.dtype), x.numel(), err])

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for n in (1, 7, 2048, 2049, 4096, 32768, 65536 + 5):
            for rep in range(3):                       # both halves of the buffer, reused
                x = torch.randn(n, generator=g, device=device).to(dtype)
                if fast.fits(x):
                    check(x, fast(x), f"eager{rep}")
    # a graph of three sums of different sizes, replayed with new inputs each time
    xs = [torch.zeros(n, device=device, dtype=torch.float16) for n in (4096, 100, 32768)]
    for _ in range(2):
        [fast(x) for x in xs]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fast(x) for x in xs]
    for rep in range(10):
        for x in xs:
            x.copy_(torch.randn(x.shape, generator=g, device=device))
        graph.replay()
        for x, o in zip(xs, outs):
            check(x, o, f"graph{rep}")
    torch.cuda.synchronize()
    out.with_name(f"{out.name}.rank{tp.rank}").write_text(json.dumps(res))
    dist.barrier()


if __name__ == "__main__":
    main()
