"""Fused residual add + LayerNorm / RMSNorm over the last dim.

    h = x + residual                 (rounded to the residual's dtype: the new residual stream)
    LayerNorm: y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias
    RMSNorm:   y = h / sqrt(mean(h^2) + eps) * weight
returns (y in x's dtype, h). One program normalizes one row in fp32; the row fits one block.

In a decode step the kernel is pure latency (one row of a few KB), so with programmatic
dependent launch it reads what the kernel before it cannot be writing ahead of its wait: the
weight and bias always, the residual stream when the caller says it is older than that kernel
(`residual_ready`: the blocks' residual comes from two or more kernels back). After the wait
only x is left to load. PDL["early"] = False (_triton.py) loads everything after the wait.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, tl, triton  # noqa: F401
from ._triton import interpreting as _interpreting  # noqa: F401
from ._triton import use_triton as _use_triton
from ._triton import PDL, pdl_args, pdl_wait_then_release


NORMS = ("layernorm", "rmsnorm")


@triton.jit
def _add_norm_kernel(
    x_ptr,        # [R, H] input (a sub-block's output)
    r_ptr,        # [R, H] residual stream in (unused unless HAS_RESIDUAL)
    w_ptr,        # [H] weight (unused unless HAS_WEIGHT)
    b_ptr,        # [H] bias (unused unless HAS_BIAS)
    y_ptr,        # [R, H] normalized output, x's dtype
    h_ptr,        # [R, H] new residual x + residual, residual's dtype (unused unless HAS_RESIDUAL)
    H,            # features per row
    stride_x, stride_r, stride_y, stride_h,   # row strides (the feature dim is contiguous)
    eps,
    RMS: tl.constexpr,            # RMSNorm (no mean subtraction, no bias) else LayerNorm
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,          # power of two >= H
    EARLY: tl.constexpr = False,           # weight and bias read before the PDL wait
    RESIDUAL_EARLY: tl.constexpr = False,  # the residual too (the caller vouches for it)
    PDL: tl.constexpr = False,   # programmatic dependent launch (_triton.py)
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    if EARLY:
        w = tl.load(w_ptr + cols, mask=mask & HAS_WEIGHT, other=1.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=mask & HAS_BIAS, other=0.0).to(tl.float32)
    if RESIDUAL_EARLY:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask & HAS_RESIDUAL, other=0.0)
    pdl_wait_then_release(PDL)
    if not EARLY:
        w = tl.load(w_ptr + cols, mask=mask & HAS_WEIGHT, other=1.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=mask & HAS_BIAS, other=0.0).to(tl.float32)
    if not RESIDUAL_EARLY:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask & HAS_RESIDUAL, other=0.0)
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += r.to(tl.float32)
        h = h.to(h_ptr.dtype.element_ty)   # the stream keeps its dtype; normalize what is stored
        tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
        h = h.to(tl.float32)
    if RMS:
        var = tl.sum(h * h, axis=0) / H
        y = h * tl.rsqrt(var + eps)
    else:
        mean = tl.sum(h, axis=0) / H
        d = tl.where(mask, h - mean, 0.0)
        var = tl.sum(d * d, axis=0) / H
        y = d * tl.rsqrt(var + eps)
    if HAS_WEIGHT:
        y = y * w
    if HAS_BIAS:
        y = y + b
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, h: int) -> torch.Tensor:
    t2 = t.reshape(-1, h)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def add_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
             bias: Optional[torch.Tensor] = None, eps: float = 1e-5, norm: str = "layernorm",
             out: Optional[torch.Tensor] = None, residual_out: Optional[torch.Tensor] = None,
             residual_ready: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual) over the last dim; without residual, (norm(x), x).

    norm: "layernorm" (weight, bias optional) or "rmsnorm" (weight; bias must be None).
    The normed output has x's dtype, the new residual the residual's dtype. residual_ready:
    no kernel launched since the one before this call writes `residual` (it may be read
    before the PDL wait; see the module's note)."""
    if norm not in NORMS:
        raise ValueError(f"add_norm: unknown norm {norm!r}; known: {', '.join(NORMS)}")
    if norm == "rmsnorm" and bias is not None:
        raise ValueError("add_norm: RMSNorm takes no bias")
    H = x.shape[-1]
    for name, t in (("residual", residual), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        want = x.shape if name == "residual" else (H,)
        if tuple(t.shape) != tuple(want) or t.device != x.device:
            raise ValueError(f"add_norm: {name} must be {tuple(want)} on {x.device}, got "
                             f"{tuple(t.shape)} on {t.device}")
    if not _use_triton(x):
        y, h = add_norm_ref(x, residual, weight, bias, eps, norm)
        if out is not None:
            y = out.copy_(y)
        if residual_out is not None and residual is not None:
            h = residual_out.copy_(h)
        return y, h
    x2 = _rows(x, H)
    y = out if out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, H)
    if residual is not None:
        r2 = _rows(residual, H)
        h = residual_out if residual_out is not None else torch.empty(
            x.shape, dtype=residual.dtype, device=x.device)
        h2 = h.view(-1, H)
    else:
        r2, h, h2 = x2, x, y2
    BLOCK = triton.next_power_of_2(H)
    warps = min(max(BLOCK // 512, 1), 16)
    if x2.shape[0]:
        _add_norm_kernel[(x2.shape[0],)](
            x2, r2, weight if weight is not None else x2, bias if bias is not None else x2, y2, h2,
            H, x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0), eps,
            RMS=norm == "rmsnorm", HAS_RESIDUAL=residual is not None,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK=BLOCK,
            EARLY=PDL["early"],
            RESIDUAL_EARLY=PDL["early"] and residual_ready and residual is not None,
            num_warps=warps, **pdl_args(x2))
    return y, h


def add_norm_ref(x: torch.Tensor, residual: Optional[torch.Tensor],
                 weight: Optional[torch.Tensor], bias: Optional[torch.Tensor] = None,
                 eps: float = 1e-5, norm: str = "layernorm") -> Tuple[torch.Tensor, torch.Tensor]:
    h = x if residual is None else (x.float() + residual.float()).to(residual.dtype)
    hf = h.float()
    if norm == "rmsnorm":
        y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    else:
        y = F.layer_norm(hf, hf.shape[-1:], eps=eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), h
