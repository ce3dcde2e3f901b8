"""Triton, if present. It is Linux-only: without it the `@triton.jit` kernels stay plain
functions and every wrapper runs its torch reference."""
import os
import types

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised by a subprocess test
    HAS_TRITON = False
    triton = types.SimpleNamespace(jit=lambda fn: fn)
    tl = types.SimpleNamespace(constexpr=None)


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run on the CPU through Triton's interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on")


def use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and (t.is_cuda or interpreting())


# ----------------------------------------------------------------------------- PDL
# Programmatic dependent launch (compute capability 9.0+): a kernel launched with
# `launch_pdl=True` may start while the kernel before it in the stream is still running: once
# every program of that kernel has called `griddepcontrol.launch_dependents` (or exited). It
# must then `griddepcontrol.wait` (which returns when the kernel before has finished and its
# writes are visible) before it reads or writes anything that kernel may touch. dsinfer's decode
# kernels do exactly that at their start (`pdl_wait_then_release`); the wait comes before the
# release, so at most one kernel waits ahead of the one running. What it buys is the launch: the
# next kernel's programs are resident when the running one ends, instead of being scheduled
# after it drains. Kernels from elsewhere (cuBLAS, NCCL, torch) never release early, so the
# kernel after them starts when they end, as without PDL. CUDA graphs keep the programmatic
# edges. Measured on an H100 (decode, batch 1, bench/profile_decode_gpu.py --ab pdl, same
# process and weights): Llama-7B fp16 5.147 vs 5.205-5.349 ms/token off, int8 3.200 vs 3.331,
# GPT-Neo-2.7B fp16 2.544 vs 2.717; greedy tokens identical. On by default; DSINFER_PDL=0 turns
# it off. The GEMVs can also ask L2 for the start of their weight strip before the wait
# (`prefetch_l2`, DSINFER_PDL_PREFETCH=1): slower in the same runs (int8 3.433, fp16 5.176,
# GPT-Neo 2.622), the prefetch competing with the running kernel's own weight stream; off.
# "early": the small kernels (add+norm, RoPE + cache write) read what the kernel before them
# cannot be writing (weights, tables, positions, an older residual) ahead of their wait, so
# that only that kernel's output is left to load after it (DSINFER_PDL_EARLY=0: everything
# after the wait). Decode attention does not: reading its first key block (minus the new
# keys) before the wait made the step slower (bench/RESULTS.md, session 12).
PDL = {"on": os.environ.get("DSINFER_PDL", "1") == "1",
       "prefetch": os.environ.get("DSINFER_PDL_PREFETCH", "0") == "1",   # the GEMVs' L2 asks
       "early": os.environ.get("DSINFER_PDL_EARLY", "1") == "1"}
_PDL_DEVICES: dict = {}


def pdl_launch(t: torch.Tensor) -> dict:
    """Launch options for a kernel on t's device: {"launch_pdl": True} where PDL is on and the
    GPU has it (never under the interpreter), else {}. Kernels take PDL=bool(options)."""
    if not (PDL["on"] and HAS_TRITON and t.is_cuda) or interpreting():
        return {}
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if index not in _PDL_DEVICES:      # Hopper or newer, and a Triton with the intrinsics
        _PDL_DEVICES[index] = (torch.cuda.get_device_capability(index)[0] >= 9
                               and hasattr(getattr(tl.extra, "cuda", None), "gdc_wait"))
    return {"launch_pdl": True} if _PDL_DEVICES[index] else {}


if HAS_TRITON:
    @triton.jit
    def pdl_wait_then_release(PDL: tl.constexpr):
        """With PDL: wait for the kernel before (its writes visible), then let the next kernel
        launch. A no-op otherwise."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def prefetch_l2(ptrs):
        """Ask L2 for the lines at ptrs (any shape of pointers; nothing is loaded into
        registers and nothing waits). PTX prefetch.global.L2."""
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [ptrs],
                                  dtype=tl.int32, is_pure=False, pack=1)
else:  # pragma: no cover
    pdl_wait_then_release = prefetch_l2 = None


def pdl_args(t: torch.Tensor) -> dict:
    """Keyword arguments for a kernel with a `PDL` constexpr: PDL=True plus the launch option
    where pdl_launch(t) allows it, else PDL=False."""
    opts = pdl_launch(t)
    return dict(PDL=bool(opts), **opts)
