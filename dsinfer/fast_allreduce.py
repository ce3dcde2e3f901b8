"""Tensor-parallel sums of decode-sized tensors without NCCL: kernels.allreduce's one-shot
kernel over symmetric memory (torch.distributed._symmetric_memory: a buffer of the same size
on every GPU of the group, each mapped into every rank's address space over NVLink).

    fast = NVLinkAllReduce.create(tp, device)    # collective; None where it cannot run
    y = fast(x) if fast is not None and fast.fits(x) else NCCL

`create` runs on every rank at the same point (it allocates and exchanges the buffers), checks
one sum against NCCL's, and all ranks agree through NCCL to use it only if it worked on all
of them. Sums larger than a half buffer (256 KB by default, DSINFER_FAST_ALLREDUCE_KB) go to
NCCL: the one-shot kernel reads every peer's whole tensor, which stops paying above that.
Only for ranks on one host (LOCAL_WORLD_SIZE == WORLD_SIZE). Multicast is never used.

Opt-in (DSINFER_FAST_ALLREDUCE=1), and then look-ahead decoding (inject/lookahead.py) is off:
on 2 x H100 (28 Nov 2026) the kernel measured 6.1 us per 8 KB sum against NCCL's 15.0 us in a
graph, and TP 2 Llama-7B decode passed its checks with it, but graphs with these sums replayed
on look-ahead's side stream hung in a 128-token generate (cause not found), and look-ahead
alone gained more (3.69 ms/token) than this kernel alone (3.90). On two H200s the pair ran
once (session 7: 2.772 ms/token against 2.919 for NCCL + look-ahead) and hung twice in
session 8 (an int8 generate, and a fp16 one with the LM head in the graph), so look-ahead is
not combined with it (DSINFER_LOOKAHEAD=force does, to study the hang).

A sum that waits for a peer longer than DSINFER_FAST_ALLREDUCE_SPIN polls (2^28: tens of
seconds) gives up instead of hanging the GPU (kernels/allreduce.py), and the next forward
raises one line saying which rank waited for which, at which call number, and where the
peer was (`check`, called by the decoder after every forward: reads pinned host memory, no
sync). Ranks whose call numbers differ launched different sums; equal ones would point at
the protocol.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from dsinfer.kernels import allreduce as K
from dsinfer.log import info


def enabled() -> bool:
    return os.environ.get("DSINFER_FAST_ALLREDUCE", "0") == "1"


class NVLinkAllReduce:
    def __init__(self, group, device: torch.device, half_bytes: int):
        import torch.distributed._symmetric_memory as symm_mem
        name = (group or dist.group.WORLD).group_name
        self.half_bytes = half_bytes
        self.buffer = symm_mem.empty(2 * half_bytes, dtype=torch.uint8, device=device)
        handle = symm_mem.rendezvous(self.buffer, name)
        self.rank, self.world = handle.rank, handle.world_size
        self.flags = symm_mem.empty(K.MAX_PROGRAMS * self.world, dtype=torch.int32,
                                    device=device)
        self.flags.zero_()
        flag_handle = symm_mem.rendezvous(self.flags, name)
        self.buffer_ptrs = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64,
                                        device=device)
        self.flag_ptrs = torch.tensor(list(flag_handle.buffer_ptrs), dtype=torch.int64,
                                      device=device)
        self.counters = torch.zeros(K.MAX_PROGRAMS + 1, dtype=torch.int32, device=device)
        # what a wait that gave up saw (kernels/allreduce.py), in pinned host memory that the
        # GPU writes directly (unified addressing) and the host reads without a sync
        self.status = torch.zeros(K.STATUS, dtype=torch.int32, pin_memory=True)
        self.status_ptr = torch.tensor([self.status.data_ptr()], dtype=torch.int64,
                                       device=device)
        # polls before a wait gives up: tens of seconds (a rank may still be autotuning or
        # capturing while the other waits in its first sum)
        self.spin_limit = int(os.environ.get("DSINFER_FAST_ALLREDUCE_SPIN", str(1 << 28)))
        torch.cuda.synchronize(device)
        dist.barrier(group=group)        # every rank's flags are zero before anyone signals

    def fits(self, x: torch.Tensor) -> bool:
        return x.is_cuda and K.fits(x, self.half_bytes)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return K.one_shot_all_reduce(x, self.buffer_ptrs, self.flag_ptrs, self.counters,
                                     self.status_ptr, self.rank, self.world, self.half_bytes,
                                     self.spin_limit)

    def check(self) -> None:
        """Raises if a sum gave up waiting for a peer (no sync: the status may show late)."""
        failure = status_failure(self.status.tolist(), self.rank)
        if failure:
            raise RuntimeError(failure)

    @classmethod
    def create(cls, tp, device: torch.device) -> Optional["NVLinkAllReduce"]:
        """Collective: every rank of `tp` calls it at the same point."""
        if tp.size == 1 or device.type != "cuda" or not K.HAS_TRITON or not enabled():
            return None                 # (the same environment on every rank: no collective)
        wanted = int(os.environ.get("LOCAL_WORLD_SIZE", tp.size)) == tp.size
        half = int(os.environ.get("DSINFER_FAST_ALLREDUCE_KB", "256")) << 10
        fast, why = None, "ranks on several hosts"
        if wanted:
            try:
                fast = cls(tp.group, device, half)
                why = "its check failed" if not fast._check(tp, device) else ""
            except Exception as e:   # noqa: BLE001 - no peer access, no symmetric memory ...
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        ok = torch.tensor([0 if why else 1], device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=tp.group)
        if not bool(ok.item()):
            info("dsinfer: small tensor-parallel sums use NCCL (NVLink one-shot all-reduce "
                 "not used: %s)", why or "it failed on another rank")
            return None
        return fast

    def _check(self, tp, device) -> bool:
        """A sum of rank-dependent values, twice (both buffer halves), equals NCCL's."""
        good = True
        for n in (1000, 5000):
            x = torch.arange(n, device=device, dtype=torch.float32) * (tp.rank + 1)
            want = x.clone()
            dist.all_reduce(want, group=tp.group)
            good &= torch.equal(self(x), want)
        return bool(good)


def status_failure(status, rank: int) -> str:
    """The one line for a status block (kernels/allreduce.py) that says a wait gave up; ''
    when none did."""
    failed, program, peer, awaited, reached = status
    if not failed:
        return ""
    return (f"dsinfer: the NVLink all-reduce (DSINFER_FAST_ALLREDUCE=1) on rank {rank} gave "
            f"up waiting for rank {peer} (program {program}, call {awaited}; rank {peer} had "
            f"reached call {reached}): the ranks' sums are out of step and the results since "
            "are wrong. Unset DSINFER_FAST_ALLREDUCE to sum through NCCL")
