"""kernels.allreduce (the NVLink one-shot all-reduce) under the Triton interpreter: two CPU
processes stand for two GPUs, their buffers and flags in shared memory, each process holding
every rank's buffer at its own address (as symmetric memory maps peers' buffers). The
protocol — store, flag barrier, sum; two buffer halves; per-program call counters — must give
every rank the exact sum, call after call, with calls of different sizes in between."""
import pytest
import torch
import torch.multiprocessing as mp

from dsinfer.kernels import allreduce as K
from dsinfer.kernels._triton import HAS_TRITON

WORLD, HALF = 2, 64 * 1024
SIZES = (5000, 7, 4096 + 1, 2048, 1)


def _rank(r, bufs, flags, outq):
    torch.set_num_threads(1)
    bp = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    fp = torch.tensor([f.data_ptr() for f in flags], dtype=torch.int64)
    counters = torch.zeros(K.MAX_PROGRAMS, dtype=torch.int32)
    results = []
    for i, n in enumerate(SIZES):
        g = torch.Generator().manual_seed(100 * i + r)
        x = torch.randn(n, generator=g).to(torch.float16 if i % 2 else torch.float32)
        out = torch.full_like(x, float("nan"))        # poisoned: every element must be written
        results.append(K.one_shot_all_reduce(x, bp, fp, counters, r, WORLD, HALF, out=out))
    # plain lists: a shared tensor would need the child alive until the parent reads it
    outq.put((r, [t.tolist() for t in results], counters[:4].tolist()))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_two_ranks_sum_exactly_call_after_call(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")      # inherited by the spawned ranks
    ctx = mp.get_context("spawn")
    bufs = [torch.zeros(2 * HALF, dtype=torch.uint8).share_memory_() for _ in range(WORLD)]
    flags = [torch.zeros(K.MAX_PROGRAMS * WORLD, dtype=torch.int32).share_memory_()
             for _ in range(WORLD)]
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, bufs, flags, q)) for r in range(WORLD)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(WORLD):
        r, results, counters = q.get(timeout=120)
        got[r] = (results, counters)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for i, n in enumerate(SIZES):
        dtype = torch.float16 if i % 2 else torch.float32
        xs = [torch.randn(n, generator=torch.Generator().manual_seed(100 * i + r)).to(dtype)
              for r in range(WORLD)]
        want = (xs[0].float() + xs[1].float()).to(dtype)
        for r in range(WORLD):
            assert torch.equal(torch.tensor(got[r][0][i], dtype=dtype), want), (i, n, r)
    # program 0 ran in every call, programs 1 and 2 only in the 5000- and 4097-element ones
    assert got[0][1] == got[1][1] == [5, 2, 2, 0], got[0][1]
