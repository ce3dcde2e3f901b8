"""Attention over a preallocated KV cache (decode), and prefill attention through torch SDPA.

Decode: q [B, Hq, SQ, D] holds the SQ newest tokens of each sequence (SQ = 1 for plain decode;
a few for chunked or speculative steps), already rotated and already written into the cache
k_cache, v_cache [B, Hkv, max_len, D] (write_kv does that). lengths [B] counts each sequence's
valid keys, the new ones included, so query t sits at position pos = L - SQ + t and sees keys
    j <= pos                       (causal)
    pos - j < window               (local attention, GPT-Neo; window 0 = unlimited)
with scores  scale * q.k  +  slope[h] * (j - pos)   (ALiBi, BLOOM; the per-query shift of HF's
slope * j, which softmax ignores). GQA: query head h reads KV head h // (Hq / Hkv); one program
takes all Hq/Hkv query heads (x SQ) of a KV head as the rows of its tiles, so K/V are read once.
Long caches are cut into NUM_SPLITS chunks (flash-decoding): each program writes a partial
(max, sum, unnormalized output) and a second kernel combines them. The grid depends on max_len,
not on lengths, so a decode step can be captured in a CUDA graph.

Prefill: prefill_attention runs torch's scaled_dot_product_attention (flash / memory-efficient
kernels when there is no bias; with ALiBi, a window or keys longer than queries it passes an
explicit additive mask, which SDPA supports at its math/efficient-attention speed).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, tl, triton  # noqa: F401
from ._triton import interpreting as _interpreting  # noqa: F401
from ._triton import use_triton as _use_triton
from ._triton import pdl_args, pdl_wait_then_release


LOG2E = 1.4426950408889634


@triton.jit
def _bias_and_mask(s, j, j_mask, pos, slope, window, HAS_ALIBI: tl.constexpr,
                   HAS_WINDOW: tl.constexpr):
    """Scores s [BLOCK_R, BLOCK_N] (log2 units) of queries at pos [BLOCK_R] against keys j:
    + ALiBi slope * (j - pos), then -inf for keys past the query, beyond the window, or past
    the sequence (j_mask)."""
    rel = j[None, :] - pos[:, None]                                          # <= 0 where visible
    if HAS_ALIBI:
        s += slope[:, None] * rel.to(tl.float32)
    visible = j_mask[None, :] & (rel <= 0)
    if HAS_WINDOW:
        visible = visible & (rel > -window)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _store_partial(ml_ptr, part_ptr, row, m_i, l_i, acc, d, r_mask, out_mask,
                   HEAD_DIM: tl.constexpr):
    """One split's softmax state for _combine_kernel: (max, sum) and the unnormalized output."""
    tl.store(ml_ptr + row * 2, m_i, mask=r_mask)
    tl.store(ml_ptr + row * 2 + 1, l_i, mask=r_mask)
    tl.store(part_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=out_mask)


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """One key block of flash attention: scores s [R, N] (log2 units), values v [N, D] into
    the running max m_i [R], sum l_i [R] and unnormalized output acc [R, D]."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_attn_kernel(
    q_ptr,        # [B, Hq, SQ, D] queries
    k_ptr,        # [B, Hkv, max_len, D] key cache
    v_ptr,        # [B, Hkv, max_len, D] value cache
    len_ptr,      # [B] integer: valid keys per sequence (the SQ new ones included)
    first_ptr,    # [B] integer: keys before it are left padding (unused unless HAS_FIRST)
    slope_ptr,    # [Hq] fp32 ALiBi slopes (unused unless HAS_ALIBI)
    o_ptr,        # [B, Hq, SQ, D] output (written when NUM_SPLITS == 1)
    ml_ptr,       # [B*Hq*SQ, NUM_SPLITS, 2] fp32 partial (max in log2 units, sum of exp2)
    part_ptr,     # [B*Hq*SQ, NUM_SPLITS, D] fp32 partial unnormalized outputs
    Hkv, SQ,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_os,
    chunk,        # keys per split (a multiple of BLOCK_N)
    window,       # local attention width (keys with pos - j < window); 0 = unlimited
    qk_scale,     # softmax scale * log2(e): scores are kept in log2 units for exp2
    GROUP: tl.constexpr,        # query heads per KV head
    HEAD_DIM: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_FIRST: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,      # rows: (query head in group, query token) pairs, >= 16
    BLOCK_N: tl.constexpr,      # keys per step
    BLOCK_D: tl.constexpr,      # power of two >= HEAD_DIM
    PDL: tl.constexpr = False,   # programmatic dependent launch (_triton.py)
):
    pdl_wait_then_release(PDL)
    b = tl.program_id(0) // Hkv
    kvh = tl.program_id(0) % Hkv
    split = tl.program_id(2)
    L = tl.load(len_ptr + b).to(tl.int32)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < GROUP * SQ
    t = r % SQ
    hq = kvh * GROUP + r // SQ
    pos = L - SQ + t                                              # [BLOCK_R] query positions
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + hq[:, None] * stride_qh + t[:, None] * stride_qs
                + d[None, :], mask=r_mask[:, None] & d_mask[None, :], other=0.0)
    if HAS_ALIBI:
        slope = tl.load(slope_ptr + hq, mask=r_mask, other=0.0) * 1.4426950408889634
    else:
        slope = tl.zeros((BLOCK_R,), tl.float32)

    lo = split * chunk
    hi = tl.minimum(lo + chunk, L)
    if HAS_WINDOW:              # the earliest query (pos L - SQ) sees keys from L - SQ - window + 1
        lo = tl.maximum(lo, L - SQ - window + 1)
    if HAS_FIRST:               # left padding is a prefix: start past it (a split inside it
        lo = tl.maximum(lo, tl.load(first_ptr + b).to(tl.int32))   # sees no key, weighs 0)
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_mask = j < hi
        kv_mask = j_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + j[:, None] * stride_kn + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_R, BLOCK_N]
        s = _bias_and_mask(s, j, j_mask, pos, slope, window, HAS_ALIBI, HAS_WINDOW)
        v = tl.load(v_base + j[:, None] * stride_vn + d[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)

    out_mask = r_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        o = acc / l_i[:, None]
        tl.store(o_ptr + b * stride_ob + hq[:, None] * stride_oh + t[:, None] * stride_os
                 + d[None, :], o.to(o_ptr.dtype.element_ty), mask=out_mask)
    else:
        row = ((b * Hkv * GROUP + hq) * SQ + t) * NUM_SPLITS + split        # [BLOCK_R]
        _store_partial(ml_ptr, part_ptr, row, m_i, l_i, acc, d, r_mask, out_mask, HEAD_DIM)


@triton.jit
def _combine_kernel(
    ml_ptr,       # [B*Hq*SQ, NUM_SPLITS, 2] fp32 (max in log2 units, sum)
    part_ptr,     # [B*Hq*SQ, NUM_SPLITS, D] fp32
    o_ptr,        # [B, Hq, SQ, D] output
    Hq, SQ,
    stride_ob, stride_oh, stride_os,
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    PDL: tl.constexpr = False,   # programmatic dependent launch (_triton.py)
):
    pdl_wait_then_release(PDL)
    row = tl.program_id(0)                       # (b * Hq + h) * SQ + t
    b = row // (Hq * SQ)
    h = (row // SQ) % Hq
    t = row % SQ
    sp = tl.arange(0, BLOCK_S)
    sp_mask = sp < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    base = row.to(tl.int64) * NUM_SPLITS + sp
    m = tl.load(ml_ptr + base * 2, mask=sp_mask, other=float("-inf"))
    l = tl.load(ml_ptr + base * 2 + 1, mask=sp_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))   # splits that saw no key weigh 0
    part = tl.load(part_ptr + base[:, None] * HEAD_DIM + d[None, :],
                   mask=sp_mask[:, None] & d_mask[None, :], other=0.0)
    o = tl.sum(part * w[:, None], axis=0) / tl.sum(w * l, axis=0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + t * stride_os + d,
             o.to(o_ptr.dtype.element_ty), mask=d_mask)


MIN_TRITON_HEAD_DIM = 16   # tl.dot needs K >= 16; smaller heads (toy models) use the reference


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _check_decode(q, k_cache, v_cache, lengths, alibi_slopes, window, first_key=None):
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_attention: q must be [B, Hq, SQ, D] and the caches equal "
                         f"[B, Hkv, max_len, D], got {tuple(q.shape)}, {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    B, Hq, SQ, D = q.shape
    Bc, Hkv, max_len, Dc = k_cache.shape
    if Bc != B or Dc != D or Hq % Hkv:
        raise ValueError(f"decode_attention: cache {tuple(k_cache.shape)} does not fit q "
                         f"{tuple(q.shape)} (batch, head_dim, query heads a multiple of KV heads)")
    if SQ > max_len:
        raise ValueError(f"decode_attention: {SQ} query tokens exceed the cache ({max_len})")
    if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        raise TypeError(f"decode_attention: q {q.dtype} and caches {k_cache.dtype}, "
                        f"{v_cache.dtype} must share a dtype")
    if tuple(lengths.shape) != (B,) or lengths.dtype.is_floating_point:
        raise ValueError(f"decode_attention: lengths must be integer [{B}], got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")
    if first_key is not None and (tuple(first_key.shape) != (B,)
                                  or first_key.dtype.is_floating_point):
        raise ValueError(f"decode_attention: first_key must be integer [{B}], got "
                         f"{first_key.dtype} {tuple(first_key.shape)}")
    if alibi_slopes is not None and tuple(alibi_slopes.shape) != (Hq,):
        raise ValueError(f"decode_attention: alibi_slopes must be [{Hq}], got "
                         f"{tuple(alibi_slopes.shape)}")
    if window < 0:
        raise ValueError(f"decode_attention: window must be >= 0 (0 = unlimited), got {window}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"decode_attention: {name} needs a contiguous head_dim")
        if t.device != q.device:
            raise ValueError(f"decode_attention: {name} on {t.device}, q on {q.device}")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     lengths: torch.Tensor, scale: Optional[float] = None,
                     alibi_slopes: Optional[torch.Tensor] = None, window: int = 0,
                     num_splits: Optional[int] = None, out: Optional[torch.Tensor] = None,
                     first_key: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(scale q k^T + alibi, causal & window masked) v over the cache -> [B, Hq, SQ, D].

    q [B, Hq, SQ, D] (any strides, contiguous D); caches [B, Hkv, max_len, D]; lengths [B]
    (int, on q's device). scale defaults to 1/sqrt(D) (GPT-Neo uses 1.0). num_splits (keys
    cut into that many chunks) defaults to filling the GPU; out may be a strided [B, Hq, SQ, D].
    first_key [B] (int, optional): keys 0 .. first_key[b] - 1 are left padding, masked."""
    _check_decode(q, k_cache, v_cache, lengths, alibi_slopes, window, first_key)
    B, Hq, SQ, D = q.shape
    Hkv, max_len = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if out is None:
        out = torch.empty((B, Hq, SQ, D), dtype=q.dtype, device=q.device)
    elif tuple(out.shape) != (B, Hq, SQ, D) or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"decode_attention: out must be {q.dtype} [{B}, {Hq}, {SQ}, {D}]")
    if not _use_triton(q) or D < MIN_TRITON_HEAD_DIM:
        return out.copy_(decode_attention_ref(q, k_cache, v_cache, lengths, scale,
                                              alibi_slopes, window, first_key))
    G = Hq // Hkv
    interp = _interpreting()
    BLOCK_R = max(16, min(triton.next_power_of_2(G * SQ), 64))
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_N = 16 if interp else (64 if BLOCK_D <= 128 else 32)
    row_blocks = triton.cdiv(G * SQ, BLOCK_R)
    if num_splits is None:
        base = B * Hkv * row_blocks
        target = 1 if interp else 2 * _sm_count(q.device.index or 0)
        num_splits = max(1, min(target // base, triton.cdiv(max_len, 256)))
    chunk = triton.cdiv(triton.cdiv(max_len, num_splits), BLOCK_N) * BLOCK_N
    num_splits = triton.cdiv(max_len, chunk)
    if num_splits > 1:
        ml = torch.empty((B * Hq * SQ, num_splits, 2), dtype=torch.float32, device=q.device)
        part = torch.empty((B * Hq * SQ, num_splits, D), dtype=torch.float32, device=q.device)
    else:
        ml = part = out
    slopes = alibi_slopes.float().contiguous() if alibi_slopes is not None else out
    _decode_attn_kernel[(B * Hkv, row_blocks, num_splits)](
        q, k_cache, v_cache, lengths, first_key if first_key is not None else lengths, slopes,
        out, ml, part, Hkv, SQ,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *out.stride()[:3],
        chunk, window, scale * LOG2E,
        GROUP=G, HEAD_DIM=D, HAS_ALIBI=alibi_slopes is not None, HAS_WINDOW=window > 0,
        HAS_FIRST=first_key is not None, NUM_SPLITS=num_splits,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=4,
        num_stages=3 if BLOCK_D <= 128 else 2, **pdl_args(q))
    if num_splits > 1:
        _combine_kernel[(B * Hq * SQ,)](
            ml, part, out, Hq, SQ, *out.stride()[:3], NUM_SPLITS=num_splits, HEAD_DIM=D,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=BLOCK_D, num_warps=4,
            **pdl_args(q))
    return out


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             start: torch.Tensor) -> None:
    """Writes k, v [B, Hkv, S, D] into the caches at positions start[b] .. start[b] + S - 1
    (start: integer [B] on the caches' device; no host sync, so it can sit in a CUDA graph)."""
    B, _, S, _ = k.shape
    idx = start.to(torch.long)[:, None] + torch.arange(S, device=k.device)     # [B, S]
    rows = torch.arange(B, device=k.device)[:, None].expand(B, S)
    k_cache.transpose(1, 2)[rows, idx] = k.transpose(1, 2).to(k_cache.dtype)
    v_cache.transpose(1, 2)[rows, idx] = v.transpose(1, 2).to(v_cache.dtype)


def _bias(q_pos, k_len, heads, alibi_slopes, window, device):
    """Additive fp32 mask [1 | heads, SQ, k_len]: causal, window and ALiBi for query positions."""
    j = torch.arange(k_len, device=device)
    rel = j[None, :] - q_pos[:, None]                                   # [SQ, k_len]
    visible = rel <= 0
    if window:
        visible &= rel > -window
    bias = torch.zeros(rel.shape, device=device).masked_fill(~visible, float("-inf"))[None]
    if alibi_slopes is not None:
        bias = bias + alibi_slopes.float().to(device)[:, None, None] * rel[None].float()
    return bias


def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: Optional[float] = None, alibi_slopes: Optional[torch.Tensor] = None,
                      window: int = 0, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention of q [B, Hq, S, D] over k, v [B, Hkv, Sk, D] (Sk >= S: the queries are
    the last S positions) through torch SDPA. attn_mask (additive float or bool "keep",
    broadcastable to [B, Hq, S, Sk], e.g. left padding) is combined with the causal mask."""
    B, Hq, S, D = q.shape
    Sk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    k, v = _expand_kv(k, Hq), _expand_kv(v, Hq)
    if alibi_slopes is None and not window and attn_mask is None and Sk == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    q_pos = torch.arange(Sk - S, Sk, device=q.device)
    bias = _bias(q_pos, Sk, Hq, alibi_slopes, window, q.device)[None]    # [1, 1|Hq, S, Sk]
    if attn_mask is not None:
        bias = bias + (attn_mask if attn_mask.dtype != torch.bool else torch.zeros(
            attn_mask.shape, device=q.device).masked_fill(~attn_mask, float("-inf")))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                  scale: float, alibi_slopes: Optional[torch.Tensor] = None,
                  window: int = 0) -> torch.Tensor:
    """Plain fp32 maths for one sequence: q [Hq, SQ, D] at positions q_pos [SQ] over the keys
    k, v [Hkv, Lk, D] at positions 0 .. Lk-1 -> [Hq, SQ, D] in q's dtype."""
    Hq = q.shape[0]
    kf, vf = _expand_kv(k[None].float(), Hq)[0], _expand_kv(v[None].float(), Hq)[0]
    s = scale * q.float() @ kf.transpose(-1, -2)
    s = s + _bias(q_pos.to(q.device), k.shape[1], Hq, alibi_slopes, window, q.device)
    return (torch.softmax(s, dim=-1) @ vf).to(q.dtype)


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         lengths: torch.Tensor, scale: Optional[float] = None,
                         alibi_slopes: Optional[torch.Tensor] = None, window: int = 0,
                         first_key: Optional[torch.Tensor] = None) -> torch.Tensor:
    """attention_ref's maths over the whole cache, keys at or past lengths[b] (and before
    first_key[b]) masked: no host sync, so it can also run inside a CUDA graph."""
    B, Hq, SQ, D = q.shape
    L = k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k, v = _expand_kv(k_cache.float(), Hq), _expand_kv(v_cache.float(), Hq)
    s = scale * q.float() @ k.transpose(-1, -2)                          # [B, Hq, SQ, L]
    q_pos = lengths.long()[:, None] - SQ + torch.arange(SQ, device=q.device)   # [B, SQ]
    rel = torch.arange(L, device=q.device)[None, None, :] - q_pos[:, :, None]  # [B, SQ, L]
    visible = rel <= 0
    if window:
        visible &= rel > -window
    if first_key is not None:
        visible &= torch.arange(L, device=q.device) >= first_key.long()[:, None, None]
    s = s.masked_fill(~visible[:, None], float("-inf"))
    if alibi_slopes is not None:
        s = s + alibi_slopes.float().to(q.device)[None, :, None, None] * rel[:, None].float()
    return (torch.softmax(s, dim=-1) @ v).to(q.dtype)


def prefill_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: Optional[float] = None,
                          alibi_slopes: Optional[torch.Tensor] = None, window: int = 0
                          ) -> torch.Tensor:
    S, Sk, D = q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q_pos = torch.arange(Sk - S, Sk, device=q.device)
    return torch.stack([attention_ref(q[b], k[b], v[b], q_pos, scale, alibi_slopes, window)
                        for b in range(q.shape[0])])
