"""One-shot all-reduce over peer-mapped GPU memory (NVLink), for the small sums of decode.

A decode step's tensor-parallel sums are tiny ([B, 1, hidden]: 8 KB at Llama-7B, batch 1) and
there are two per layer; NCCL's fixed cost per call (~10-15 us inside a CUDA graph on two H100s)
then outweighs the GEMV the rank saved. Here every rank's partial goes into its own slot of a
buffer every GPU of the group can address (symmetric memory, set up by dsinfer.fast_allreduce),
and one kernel launch per rank does the rest:

    program p (elements [p * BLOCK, (p + 1) * BLOCK)), call number e of program p:
      1. store the partial into my buffer, half e % 2
      2. barrier: write e into every peer's flag [p, me] (release, system scope), then wait
         until my flag [p, peer] >= e for every peer (acquire, system scope)
      3. sum the half e % 2 of every rank's buffer (uncached loads, fp32), store the result

Why one barrier is enough: call e + 2 overwrites half e % 2 only after passing the barrier of
call e + 1, which every peer reaches only after its reads of call e. The call numbers live on
the device (one counter per program), so a CUDA graph replays the protocol correctly, and all
ranks agree on them because they launch the same sequence of sums with the same shapes.
No multicast (NVLS) is used. Only for ranks on one host with peer access; the caller checks.

A wait gives up after `spin_limit` polls instead of hanging the GPU: ranks whose sums fell out
of step (one launched a sum the other did not) would otherwise spin forever. The first program
to give up sets the failed flag (counters[MAX_PROGRAMS], device memory: later calls stop
waiting too, so the step ends and the host regains control) and writes what it saw to the
status block, int32 [STATUS] in memory the host can read without a sync (pinned, mapped):
    [failed, program, peer rank, call number awaited, call number the peer had reached]
The sums are then wrong; the caller checks the status and raises (dsinfer.fast_allreduce).
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, tl, triton  # noqa: F401 (HAS_TRITON: for callers)

BLOCK = 2048            # elements per program
MAX_PROGRAMS = 64       # flags are sized for this many programs; counters for one more (failed)
STATUS = 5              # int32s of the status block (see above)


@triton.jit
def _one_shot_kernel(x_ptr, out_ptr, bufs_ptr, flags_ptr, counters_ptr, status_ptr, n,
                     half_elems, spin_limit, RANK: tl.constexpr, WORLD: tl.constexpr,
                     BLOCK: tl.constexpr, MAX_PROGRAMS: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    epoch = tl.load(counters_ptr + pid) + 1
    tl.store(counters_ptr + pid, epoch)
    half = (epoch % 2).to(tl.int64) * half_elems
    dt = x_ptr.dtype.element_ty
    mine = tl.load(bufs_ptr + RANK).to(tl.pointer_type(dt))
    tl.store(mine + half + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)
    tl.debug_barrier()                        # the block's stores before the release below
    for p in tl.static_range(WORLD):
        if p != RANK:
            peer = tl.load(flags_ptr + p).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(peer + pid * WORLD + RANK, epoch, sem="release", scope="sys")
    own = tl.load(flags_ptr + RANK).to(tl.pointer_type(tl.int32))
    failed = counters_ptr + MAX_PROGRAMS
    for p in tl.static_range(WORLD):
        if p != RANK:
            seen = tl.atomic_add(own + pid * WORLD + p, 0, sem="acquire", scope="sys")
            if seen < epoch:                  # waiting anyway: unless an earlier call gave up
                spins = tl.load(failed, volatile=True) * spin_limit
                while (seen < epoch) & (spins < spin_limit):
                    seen = tl.atomic_add(own + pid * WORLD + p, 0, sem="acquire", scope="sys")
                    spins += 1
                if seen < epoch:              # gave up (or an earlier call did): say so
                    tl.store(failed, 1)
                    st = tl.load(status_ptr).to(tl.pointer_type(tl.int32))
                    if tl.load(st, volatile=True) == 0:
                        tl.store(st + 1, pid)
                        tl.store(st + 2, p)
                        tl.store(st + 3, epoch)
                        tl.store(st + 4, seen)
                        tl.store(st, 1)       # (diagnostics: no barrier in a branch)
    tl.debug_barrier()                        # every thread reads after the acquire
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for p in tl.static_range(WORLD):          # the same order on every rank: equal results
        src = tl.load(bufs_ptr + p).to(tl.pointer_type(dt))
        acc += tl.load(src + half + offs, mask=mask, other=0.0,
                       cache_modifier=".cv").to(tl.float32)
    tl.store(out_ptr + offs, acc.to(dt), mask=mask)


def one_shot_all_reduce(x: torch.Tensor, buffers: torch.Tensor, flags: torch.Tensor,
                        counters: torch.Tensor, status: torch.Tensor, rank: int, world: int,
                        half_bytes: int, spin_limit: int = 1 << 28,
                        out: torch.Tensor = None) -> torch.Tensor:
    """The sum over ranks of x (contiguous, numel <= MAX_PROGRAMS * BLOCK and <= half_bytes
    of its dtype), as a new tensor. buffers / flags: int64 [world] addresses of every rank's
    buffer (2 * half_bytes) and flags (int32 [MAX_PROGRAMS, world]) as mapped here;
    counters: this rank's int32 [MAX_PROGRAMS + 1], zero at the start on every rank; status:
    int64 [1], the address of this rank's int32 [STATUS] status block (zeros). A wait gives up
    after spin_limit polls (see above). `out` (like x) receives the sum when given."""
    n = x.numel()
    out = torch.empty_like(x) if out is None else out
    grid = (triton.cdiv(n, BLOCK),)
    _one_shot_kernel[grid](x, out, buffers, flags, counters, status, n,
                           half_bytes // x.element_size(), spin_limit, RANK=rank, WORLD=world,
                           BLOCK=BLOCK, MAX_PROGRAMS=MAX_PROGRAMS, num_warps=4)
    return out


def fits(x: torch.Tensor, half_bytes: int) -> bool:
    n = x.numel()
    return (x.is_contiguous() and 0 < n <= MAX_PROGRAMS * BLOCK
            and n * x.element_size() <= half_bytes
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32))
