"""Rotary position embedding (RoPE) on the first `rotary_dim` features of each head.

For pair i < rotary_dim / 2 at position p, angle a = p * inv_freq[i] (base^(-2i / rotary_dim)):
    x1' = x1 cos a - x2 sin a,   x2' = x2 cos a + x1 sin a
where the pair (x1, x2) is
    "neox" (GPT-NeoX, Llama, rotate-half): (x[i], x[i + rotary_dim/2])
    "gptj" (GPT-J, interleaved):            (x[2i], x[2i + 1])
Features from rotary_dim on pass through. x is [batch, seq, heads, head_dim] (any strides with a
contiguous head_dim; pass q.transpose(1, 2) for [batch, heads, seq, head_dim]) or [tokens, heads,
head_dim]; positions [batch, seq] (or [tokens]) index the cos/sin tables [max_pos, rotary_dim/2]
(fp32) that rotary_cache builds, so a decode step under a CUDA graph only updates positions.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._triton import HAS_TRITON, tl, triton  # noqa: F401
from ._triton import interpreting as _interpreting  # noqa: F401
from ._triton import use_triton as _use_triton
from ._triton import pdl_args, pdl_wait_then_release


STYLES = ("neox", "gptj")


@triton.jit
def rope_pairs(i, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Feature indices (x1, x2) of rotation pair i: (2i, 2i + 1) for "gptj", (i, i + HALF) for
    "neox"."""
    if INTERLEAVED:
        i1 = 2 * i
        i2 = 2 * i + 1
    else:
        i1 = i
        i2 = i + HALF
    return i1, i2


@triton.jit
def _rotary_kernel(
    x_ptr,        # [B, S, H, D] input (head_dim contiguous)
    y_ptr,        # [B, S, H, D] output (may alias x: in place)
    cos_ptr,      # [max_pos, HALF] fp32
    sin_ptr,      # [max_pos, HALF] fp32
    pos_ptr,      # [B, S] integer positions
    S, H,
    stride_xb, stride_xs, stride_xh, stride_yb, stride_ys, stride_yh,
    stride_pb, stride_ps, stride_cos,
    HALF: tl.constexpr,       # rotary_dim // 2: pairs per head
    HEAD_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr,  # "gptj" pairs (2i, 2i+1), else "neox" pairs (i, i + HALF)
    COPY_REST: tl.constexpr,    # copy features HALF*2 .. HEAD_DIM (out of place, partial rotary)
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
    PDL: tl.constexpr = False,   # programmatic dependent launch (_triton.py)
):
    pdl_wait_then_release(PDL)
    token = tl.program_id(0)
    b = token // S
    s = token % S
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    h_mask = heads < H
    i_mask = i < HALF
    pos = tl.load(pos_ptr + b * stride_pb + s * stride_ps).to(tl.int64)
    cos = tl.load(cos_ptr + pos * stride_cos + i, mask=i_mask, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cos + i, mask=i_mask, other=0.0)[None, :]
    i1, i2 = rope_pairs(i, HALF, INTERLEAVED)
    x_row = x_ptr + b.to(tl.int64) * stride_xb + s * stride_xs + heads[:, None] * stride_xh
    y_row = y_ptr + b.to(tl.int64) * stride_yb + s * stride_ys + heads[:, None] * stride_yh
    mask = h_mask[:, None] & i_mask[None, :]
    x1 = tl.load(x_row + i1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + i2[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_row + i1[None, :], (x1 * cos - x2 * sin).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_row + i2[None, :], (x2 * cos + x1 * sin).to(y_ptr.dtype.element_ty), mask=mask)
    if COPY_REST:
        r = 2 * HALF + tl.arange(0, BLOCK_REST)
        r_mask = h_mask[:, None] & (r < HEAD_DIM)[None, :]
        tl.store(y_row + r[None, :], tl.load(x_row + r[None, :], mask=r_mask), mask=r_mask)


def rotary_cache(max_pos: int, rotary_dim: int, base: float = 10000.0,
                 device=None, inv_freq: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each fp32 [max_pos, rotary_dim // 2]. Pass inv_freq [rotary_dim // 2] for
    scaled variants (e.g. Llama-3 rope scaling) computed by the model's own recipe."""
    if inv_freq is None:
        inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64,
                                               device=device) / rotary_dim)
    angles = torch.arange(max_pos, dtype=torch.float64, device=device)[:, None] \
        * inv_freq.to(device=device, dtype=torch.float64)[None, :]
    return angles.cos().float(), angles.sin().float()


def _check(x, cos, sin, positions, style, rotary_dim):
    if style not in STYLES:
        raise ValueError(f"apply_rotary: unknown style {style!r}; known: {', '.join(STYLES)}")
    if x.dim() not in (3, 4):
        raise ValueError(f"apply_rotary: x must be [batch, seq, heads, head_dim] or [tokens, "
                         f"heads, head_dim], got {tuple(x.shape)}")
    D = x.shape[-1]
    rotary_dim = D if rotary_dim is None else rotary_dim
    if rotary_dim % 2 or not 0 < rotary_dim <= D:
        raise ValueError(f"apply_rotary: rotary_dim {rotary_dim} must be even and in (0, {D}]")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != rotary_dim // 2:
        raise ValueError(f"apply_rotary: cos/sin must be [max_pos, {rotary_dim // 2}], got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if tuple(positions.shape) != tuple(x.shape[:-2]) or positions.dtype.is_floating_point:
        raise ValueError(f"apply_rotary: positions must be integer {tuple(x.shape[:-2])}, got "
                         f"{positions.dtype} {tuple(positions.shape)}")
    return rotary_dim


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 style: str = "neox", rotary_dim: Optional[int] = None, inplace: bool = False
                 ) -> torch.Tensor:
    """RoPE of x [B, S, H, D] (or [T, H, D]) at positions [B, S] (or [T]); returns a tensor
    laid out like x (x itself when inplace)."""
    rotary_dim = _check(x, cos, sin, positions, style, rotary_dim)
    if not _use_triton(x):
        y = apply_rotary_ref(x, cos, sin, positions, style, rotary_dim)
        return x.copy_(y) if inplace else y
    if x.stride(-1) != 1:
        raise ValueError("apply_rotary: head_dim must be contiguous (stride 1)")
    x4 = x if x.dim() == 4 else x.unsqueeze(0)
    p2 = positions if positions.dim() == 2 else positions.unsqueeze(0)
    y4 = x4 if inplace else torch.empty_like(x4)
    B, S, H, D = x4.shape
    half = rotary_dim // 2
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    BLOCK_H = min(triton.next_power_of_2(H), 16)
    if B * S:
        _rotary_kernel[(B * S, triton.cdiv(H, BLOCK_H))](
            x4, y4, cos, sin, p2, S, H, *x4.stride()[:3], *y4.stride()[:3], *p2.stride(),
            cos.stride(0), HALF=half, HEAD_DIM=D, INTERLEAVED=style == "gptj",
            COPY_REST=not inplace and rotary_dim < D, BLOCK_H=BLOCK_H,
            BLOCK_HALF=triton.next_power_of_2(half),
            BLOCK_REST=triton.next_power_of_2(max(D - rotary_dim, 1)), num_warps=4,
            **pdl_args(x4))
    return y4 if x.dim() == 4 else y4[0]


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     positions: torch.Tensor, style: str = "neox",
                     rotary_dim: Optional[int] = None) -> torch.Tensor:
    D = x.shape[-1]
    r = D if rotary_dim is None else rotary_dim
    c = cos[positions.long()].float().unsqueeze(-2)       # [..., 1, r/2], broadcast over heads
    s = sin[positions.long()].float().unsqueeze(-2)
    xr, rest = x[..., :r].float(), x[..., r:]
    if style == "gptj":
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :r // 2], xr[..., r // 2:]
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((out.to(x.dtype), rest), dim=-1)
