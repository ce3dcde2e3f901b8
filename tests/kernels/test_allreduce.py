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


def _rank(r, bufs, flags, outq, extra=0):
    """Rank r's calls: the SIZES sums, then `extra` more that no peer joins (a wait that must
    give up after its spin limit instead of hanging)."""
    torch.set_num_threads(1)
    bp = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    fp = torch.tensor([f.data_ptr() for f in flags], dtype=torch.int64)
    counters = torch.zeros(K.MAX_PROGRAMS + 1, dtype=torch.int32)
    status = torch.zeros(K.STATUS, dtype=torch.int32)
    sp = torch.tensor([status.data_ptr()], dtype=torch.int64)
    results = []
    for i, n in enumerate(SIZES):
        g = torch.Generator().manual_seed(100 * i + r)
        x = torch.randn(n, generator=g).to(torch.float16 if i % 2 else torch.float32)
        out = torch.full_like(x, float("nan"))        # poisoned: every element must be written
        results.append(K.one_shot_all_reduce(x, bp, fp, counters, sp, r, WORLD, HALF, out=out))
    done = status.tolist()
    for i in range(extra):          # the first gives up after 200 polls; later ones must not
        K.one_shot_all_reduce(torch.ones(10), bp, fp, counters, sp, r, WORLD, HALF,  # wait
                              spin_limit=200 if i == 0 else 1 << 30)
    # plain lists: a shared tensor would need the child alive until the parent reads it
    outq.put((r, [t.tolist() for t in results], counters[:4].tolist(),
              counters[K.MAX_PROGRAMS].item(), done, status.tolist()))


def _run(extra=(0, 0)):
    ctx = mp.get_context("spawn")
    bufs = [torch.zeros(2 * HALF, dtype=torch.uint8).share_memory_() for _ in range(WORLD)]
    flags = [torch.zeros(K.MAX_PROGRAMS * WORLD, dtype=torch.int32).share_memory_()
             for _ in range(WORLD)]
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, bufs, flags, q, extra[r])) for r in range(WORLD)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(WORLD):
        r, *rest = q.get(timeout=120)
        got[r] = rest
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return got


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_two_ranks_sum_exactly_call_after_call(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")      # inherited by the spawned ranks
    got = _run()
    for i, n in enumerate(SIZES):
        dtype = torch.float16 if i % 2 else torch.float32
        xs = [torch.randn(n, generator=torch.Generator().manual_seed(100 * i + r)).to(dtype)
              for r in range(WORLD)]
        want = (xs[0].float() + xs[1].float()).to(dtype)
        for r in range(WORLD):
            assert torch.equal(torch.tensor(got[r][0][i], dtype=dtype), want), (i, n, r)
    # program 0 ran in every call, programs 1 and 2 only in the 5000- and 4097-element ones
    assert got[0][1] == got[1][1] == [5, 2, 2, 0], got[0][1]
    assert [got[r][2:] for r in range(WORLD)] == [[0, [0] * K.STATUS, [0] * K.STATUS]] * 2


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_a_sum_no_peer_joins_gives_up_and_says_so(monkeypatch):
    """Rank 0 launches two sums rank 1 never does (ranks out of step): the first waits its
    spin limit and gives up, the second does not wait at all (the failed flag), and the
    status block names the program, the peer and both call numbers."""
    from dsinfer.fast_allreduce import status_failure
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    got = _run(extra=(2, 0))
    failed, done, status = got[0][2:]
    assert failed == 1 and done == [0] * K.STATUS
    assert status == [1, 0, 1, 6, 5], status      # program 0 awaited call 6; rank 1 was at 5
    assert got[1][2:] == [0, [0] * K.STATUS, [0] * K.STATUS]
    line = status_failure(status, 0)
    assert "rank 0 gave up waiting for rank 1 (program 0, call 6; rank 1 had reached call 5)" \
        in line and "Unset DSINFER_FAST_ALLREDUCE" in line
    assert status_failure([0] * K.STATUS, 0) == ""
