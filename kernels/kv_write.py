"""One launch from a QKV projection to the KV cache: RoPE on q (in place) and k, k and v stored
at the cache slots of the new tokens. Replaces a rotary launch and two cache copies per layer.

    qkv    [B, S, W] the projection's output, each head's D features contiguous; W holds
           "packed"   [q_0 .. q_{H-1} | k_0 .. k_{Hkv-1} | v_0 .. v_{Hkv-1}]  (H*D + 2*Hkv*D)
           "per_head" [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]                       (3*H*D, Hkv = H)
    caches [B, Hkv, max_len, D]: token s of row b goes to index slot[0] + s (every row of the
           batch shares the start; `slot` is a device tensor, so the step can sit in a CUDA graph)
    positions [B, S], cos / sin [max_pos, rotary_dim / 2] fp32 (see rotary.py for the styles)

One program per (tokens, head slot): head slots 0..H-1 are queries, H..H+Hkv-1 keys, then
values; one token a program in decode steps, PREFILL_TOKENS in a prompt.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._triton import HAS_TRITON, tl, triton  # noqa: F401
from ._triton import use_triton as _use_triton
from ._triton import PDL, pdl_args, pdl_wait_then_release
from .rotary import STYLES, apply_rotary_ref, rope_pairs

LAYOUTS = ("packed", "per_head")
PREFILL_TOKENS = 16     # tokens a program of a multi-token call (see qkv_to_cache)


@triton.jit
def _cos_sin(cos_ptr, sin_ptr, pos, rows, stride_cos, HALF: tl.constexpr,
             BLOCK_HALF: tl.constexpr):
    """The rows' cos, sin [TOK, BLOCK_HALF] at positions pos [TOK, 1] (0 past HALF)."""
    i = tl.arange(0, BLOCK_HALF)[None, :]
    i_mask = (i < HALF) & rows
    cos = tl.load(cos_ptr + pos * stride_cos + i, mask=i_mask, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cos + i, mask=i_mask, other=0.0)
    return cos, sin


@triton.jit
def _rotate(src, dst, cos, sin, rows, D: tl.constexpr,
            HALF: tl.constexpr, INTERLEAVED: tl.constexpr, COPY_REST: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """RoPE of head vectors src -> dst (may be src: both halves are loaded first); src, dst
    and rows (which rows are real) are [TOK, 1], cos / sin [TOK, BLOCK_HALF] (_cos_sin); with
    COPY_REST the features past rotary_dim are copied too (dst elsewhere)."""
    i = tl.arange(0, BLOCK_HALF)[None, :]
    i_mask = (i < HALF) & rows
    i1, i2 = rope_pairs(i, HALF, INTERLEAVED)
    x1 = tl.load(src + i1, mask=i_mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + i2, mask=i_mask, other=0.0).to(tl.float32)
    if COPY_REST:
        d = tl.arange(0, BLOCK_D)[None, :]
        rest = (d >= 2 * HALF) & (d < D) & rows
        tl.store(dst + d, tl.load(src + d, mask=rest), mask=rest)
    tl.store(dst + i1, (x1 * cos - x2 * sin).to(dst.dtype.element_ty), mask=i_mask)
    tl.store(dst + i2, (x2 * cos + x1 * sin).to(dst.dtype.element_ty), mask=i_mask)


@triton.jit
def _qkv_cache_kernel(
    qkv_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr,
    S, n_tokens, stride_qb, stride_qs,          # qkv row strides (features contiguous)
    stride_cb, stride_ch, stride_cl,            # cache strides (head_dim contiguous)
    stride_pb, stride_ps, stride_cos,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    HALF: tl.constexpr,                         # rotary_dim // 2 (0: no rotary)
    INTERLEAVED: tl.constexpr, PER_HEAD: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_HALF: tl.constexpr,
    TOK: tl.constexpr,                          # tokens per program (1 in decode steps)
    EARLY: tl.constexpr = False,  # positions, slot, cos / sin read before the PDL wait
    PDL: tl.constexpr = False,   # programmatic dependent launch (_triton.py)
):
    t = tl.program_id(0) * TOK + tl.arange(0, TOK)     # [TOK] tokens of the flat [B * S]
    sh = tl.program_id(1)                       # head slot: queries, then keys, then values
    real = t < n_tokens
    b = t // S
    s = t % S
    rows = real[:, None]                        # [TOK, 1]
    row = (qkv_ptr + b.to(tl.int64) * stride_qb + s * stride_qs)[:, None]
    # positions, slot and the cos / sin tables are written before the step's kernels (host
    # copies, or the kernels before the first of a PDL chain): with EARLY read ahead of the
    # wait, so that only qkv (the kernel before's output) is left to load after it
    if not EARLY:
        pdl_wait_then_release(PDL)
    pos = tl.load(pos_ptr + b * stride_pb + s * stride_ps, mask=real, other=0)
    pos = pos.to(tl.int64)[:, None]
    cos, sin = _cos_sin(cos_ptr, sin_ptr, pos, rows & (HALF > 0), stride_cos, HALF, BLOCK_HALF)
    slot = tl.load(slot_ptr).to(tl.int64) + s
    if EARLY:
        pdl_wait_then_release(PDL)
    if sh < H:                                  # query: rotated in place, nothing stored
        if HALF > 0:
            if PER_HEAD:
                q = row + 3 * sh * D
            else:
                q = row + sh * D
            _rotate(q, q, cos, sin, rows, D, HALF, INTERLEAVED, False, BLOCK_D, BLOCK_HALF)
    else:
        r = sh - H
        j = r % HKV
        at = (b.to(tl.int64) * stride_cb + j * stride_ch + slot * stride_cl)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        dm = (d < D) & rows
        if r < HKV:                             # key: rotated into the cache
            if PER_HEAD:
                k = row + (3 * j + 1) * D
            else:
                k = row + (H + j) * D
            if HALF > 0:
                _rotate(k, k_ptr + at, cos, sin, rows, D, HALF, INTERLEAVED, True, BLOCK_D,
                        BLOCK_HALF)
            else:
                tl.store(k_ptr + at + d, tl.load(k + d, mask=dm), mask=dm)
        else:                                   # value: copied into the cache
            if PER_HEAD:
                v = row + (3 * j + 2) * D
            else:
                v = row + (H + HKV + j) * D
            tl.store(v_ptr + at + d, tl.load(v + d, mask=dm), mask=dm)


def _check(qkv, k_cache, v_cache, slot, positions, layout, heads, kv_heads, head_dim):
    if layout not in LAYOUTS:
        raise ValueError(f"qkv_to_cache: unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if layout == "per_head" and heads != kv_heads:
        raise ValueError("qkv_to_cache: the per_head layout has as many KV heads as query heads")
    B, S, W = qkv.shape
    if W != (heads + 2 * kv_heads) * head_dim or qkv.stride(-1) != 1:
        raise ValueError(f"qkv_to_cache: qkv must be [B, S, {(heads + 2 * kv_heads) * head_dim}] "
                         f"with contiguous features, got {tuple(qkv.shape)}")
    want = (B, kv_heads, k_cache.shape[2], head_dim)
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if tuple(c.shape) != want or c.stride(-1) != 1 or c.dtype != qkv.dtype:
            raise ValueError(f"qkv_to_cache: {name} must be {qkv.dtype} {list(want)} with a "
                             f"contiguous head_dim, got {c.dtype} {tuple(c.shape)}")
    if tuple(positions.shape) != (B, S) or slot.numel() < 1:
        raise ValueError(f"qkv_to_cache: positions must be [{B}, {S}] and slot a device tensor")


def qkv_to_cache(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot: torch.Tensor, positions: torch.Tensor, heads: int, kv_heads: int,
                 head_dim: int, layout: str = "packed", cos: Optional[torch.Tensor] = None,
                 sin: Optional[torch.Tensor] = None, style: str = "neox",
                 rotary_dim: int = 0) -> None:
    """RoPE (if cos/sin are given) on q in place and on k, then k and v into the caches at
    indices slot[0] .. slot[0] + S - 1. q stays in qkv; read it from there."""
    _check(qkv, k_cache, v_cache, slot, positions, layout, heads, kv_heads, head_dim)
    rotary = cos is not None
    if rotary and (style not in STYLES or rotary_dim % 2 or not 0 < rotary_dim <= head_dim):
        raise ValueError(f"qkv_to_cache: rotary style {style!r} / rotary_dim {rotary_dim} "
                         f"invalid for head_dim {head_dim}")
    if not _use_triton(qkv):
        return qkv_to_cache_ref(qkv, k_cache, v_cache, slot, positions, heads, kv_heads,
                                head_dim, layout, cos, sin, style, rotary_dim)
    B, S, _ = qkv.shape
    cos_t = cos.float().contiguous() if rotary else qkv
    sin_t = sin.float().contiguous() if rotary else qkv
    half = rotary_dim // 2 if rotary else 0
    n = B * S
    # decode (S = 1): a program per (row, head slot); a prompt: TOKENS tokens a program (one
    # token's head is 64-256 bytes, too little work for a program: 512 tokens of Llama-7B took
    # 61 us a layer that way on an H200, ~15% of the prefill)
    tok = 1 if S == 1 else min(PREFILL_TOKENS, triton.next_power_of_2(n))
    if n:
        _qkv_cache_kernel[(triton.cdiv(n, tok), heads + 2 * kv_heads)](
            qkv, k_cache, v_cache, cos_t, sin_t, positions, slot, S, n, qkv.stride(0),
            qkv.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            positions.stride(0), positions.stride(1), cos_t.stride(0) if rotary else 0,
            H=heads, HKV=kv_heads, D=head_dim, HALF=half, INTERLEAVED=style == "gptj",
            PER_HEAD=layout == "per_head", BLOCK_D=triton.next_power_of_2(head_dim),
            BLOCK_HALF=triton.next_power_of_2(max(half, 1)), TOK=tok, EARLY=PDL["early"],
            num_warps=1 if tok == 1 else 4, **pdl_args(qkv))


def split_heads(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, layout: str):
    """Views q [B, S, H, D], k, v [B, S, Hkv, D] of a QKV projection output."""
    B, S, _ = qkv.shape
    if layout == "per_head":
        t = qkv.view(B, S, heads, 3, head_dim)
        return t[..., 0, :], t[..., 1, :], t[..., 2, :]
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return (q.view(B, S, heads, head_dim), k.view(B, S, kv_heads, head_dim),
            v.view(B, S, kv_heads, head_dim))


def qkv_to_cache_ref(qkv, k_cache, v_cache, slot, positions, heads, kv_heads, head_dim,
                     layout="packed", cos=None, sin=None, style="neox", rotary_dim=0) -> None:
    """The same maths in torch (no host sync: slot stays on the device)."""
    q, k, v = split_heads(qkv, heads, kv_heads, head_dim, layout)
    if cos is not None:
        q.copy_(apply_rotary_ref(q, cos, sin, positions, style, rotary_dim))
        k = apply_rotary_ref(k, cos, sin, positions, style, rotary_dim)
    index = slot[:1].long() + torch.arange(qkv.shape[1], device=qkv.device)
    k_cache.index_copy_(2, index, k.transpose(1, 2).to(k_cache.dtype))
    v_cache.index_copy_(2, index, v.transpose(1, 2).to(v_cache.dtype))
