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
