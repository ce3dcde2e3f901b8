"""Weight-only linear layers: int8 weights with in-kernel group dequant (W8A16), and the fp16/bf16
GEMV that decode needs where cuBLAS is weak.

    y[M, N] = x[M, K] @ dequant(q[N, K], s[G, C]).T (+ bias)    dequant: w[n, k] = q[n, k] * s[g, c]
    g = n // (N / G)  (row groups),   c = k // (K / C)  (column groups; C = 1 is per-row-group)

Paths for int8, by M (rows of x):
- M = 1: _w8_gemv_kernel (CUDA cores; DECODE_PATHS may name _linear_kernel's decode tiles
  instead, for benchmarks). _w8_gemv_kernel streams [BLOCK_N, K]
  strips of w in 8-byte chunks with x loaded in the same register layout (no shared-memory
  shuffle in the K loop), sums each chunk in registers and reduces across threads once, after
  the loop; 32-56 registers a thread (ptxas, sm_90), so many programs share an SM.
- Both int8 kernels convert with byte permutes (FAST_CVT: PRMT + one FADD / HSUB2, exact) in
  place of I2F, which runs at a quarter rate on sm_90 and alone capped the int8 GEMV below HBM
  speed. Column-group scales multiply per-chunk (GEMV) or per-K-tile (tl.dot) partial sums.
- 1 < M < PREFILL_DEQUANT_MIN_M: _linear_kernel, tiled tl.dot. Each K-step loads an int8 tile
  [BLOCK_N, BLOCK_K] (cp.async-pipelined by num_stages), converts it in registers to the
  activations' dtype and feeds tl.dot (fp32 accumulation); per-row scales are applied once to
  the accumulator, column-group scales to each K-tile's partial product. Decode tiles (M <= 16)
  are narrow in N and long in K; prefill tiles are 128-row tiles in grouped order (Triton
  tutorial 03). SWAP_AB computes w @ x.T instead (the weight tile as the MMA's first operand).
- M >= PREFILL_DEQUANT_MIN_M: dequantize w once (_dequant_kernel) and call cuBLAS: compute-bound,
  where a one-pass dequant costs a few percent and cuBLAS beats the fused kernel.
gemv() runs fp16/bf16 weights through _gemv_kernel (M <= 4), the tl.dot decode tiles (M <= 16)
and cuBLAS above.

Tuning is triton.autotune over small tables, keyed by (M bucket, N, K): the first call of each
shape benchmarks the configs (seconds), so warm up before capturing CUDA graphs. Under
TRITON_INTERPRET=1 one fixed small config runs and nothing is tuned.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F

from .activations import ACTIVATIONS, _act, bias_act, silu_mul
from .quant_ref import dequantize_ref

from ._triton import HAS_TRITON, tl, triton  # noqa: F401
from ._triton import interpreting as _interpreting  # noqa: F401
from ._triton import use_triton as _use_triton
from ._triton import PDL, pdl_args, pdl_wait_then_release, prefetch_l2


# ----------------------------------------------------------------------------- kernel

@triton.jit
def _i8_magic_f32(q):
    # int8 -> fp32 without I2F (a quarter-rate instruction on sm_90, which caps an int8 GEMV
    # below HBM speed): per 4 bytes one XOR flips the sign bits, then one PRMT per element builds
    # the fp32 bit pattern 0x4B0000uu = 2^23 + 128 + q. The caller subtracts _MAGIC_F32 (exact).
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, m;
        xor.b32 t, $4, 0x80808080;
        mov.b32 m, 0x4B000000;
        prmt.b32 $0, t, m, 0x7540;
        prmt.b32 $1, t, m, 0x7541;
        prmt.b32 $2, t, m, 0x7542;
        prmt.b32 $3, t, m, 0x7543;
        }""",
        constraints="=r,=r,=r,=r,r", args=[q], dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _i8_fast_f16(q):
    # int8 -> fp16, exact: per pair one PRMT builds fp16 0x64uu = 1024 + 128 + q, one HSUB2
    # (f16x2) subtracts 1152.
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, m, c;
        xor.b32 t, $2, 0x80808080;
        mov.b32 m, 0x64646464;
        mov.b32 c, 0x64806480;
        prmt.b32 $0, t, m, 0x4140;
        prmt.b32 $1, t, m, 0x4342;
        sub.f16x2 $0, $0, c;
        sub.f16x2 $1, $1, c;
        }""",
        constraints="=r,=r,r", args=[q], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _i8_to(q, dtype: tl.constexpr, FAST_CVT: tl.constexpr):
    """int8 tensor -> dtype, exactly (|q| <= 127 fits every float type here)."""
    if FAST_CVT:
        if dtype == tl.float16:
            return _i8_fast_f16(q)
        else:
            return (_i8_magic_f32(q) - 8388736.0).to(dtype)
    else:
        return q.to(dtype)


@triton.jit
def _w8_gemv_step(acc, w, x, s_rows, n_mask, kc, k0, K, stride_sc,
                  COL_GROUP: tl.constexpr, VEC: tl.constexpr, FAST_CVT: tl.constexpr):
    # acc [BLOCK_N, KC] += per-chunk sums of dequant(w) * x over the tile at k0;
    # w int8 [BLOCK_N, KC, VEC], x [BLOCK_N, KC, VEC] (x broadcast over rows), kc [KC] chunk
    # starts. Each thread holds whole VEC-chunks, so the sum over a chunk is an FFMA chain in
    # registers; the cross-thread reduction waits until after the K loop.
    if FAST_CVT:
        wf = _i8_magic_f32(w) - 8388736.0
    else:
        wf = w.to(tl.float32)
    xf = x.to(tl.float32)
    if COL_GROUP == 0:                       # per-row scale, applied after the loop
        acc += tl.sum(wf * xf, axis=2)
    elif COL_GROUP % VEC == 0:               # a chunk lies in one column group
        # chunks past K (the last tile) would index scale columns past C: masked, like w
        s = tl.load(s_rows[:, None] + ((k0 + kc) // COL_GROUP)[None, :] * stride_sc,
                    mask=n_mask[:, None] & (k0 + kc < K)[None, :], other=0.0)
        acc += tl.sum(wf * xf, axis=2) * s.to(tl.float32)
    else:                                    # odd group widths: a scale per element
        offs_v = tl.arange(0, VEC)
        cols = (k0 + kc[:, None] + offs_v[None, :]) // COL_GROUP
        s = tl.load(s_rows[:, None, None] + cols[None, :, :] * stride_sc,
                    mask=n_mask[:, None, None] & (k0 + kc[:, None] + offs_v[None, :] < K)[None],
                    other=0.0)
        acc += tl.sum(wf * s.to(tl.float32) * xf, axis=2)
    return acc


@triton.jit
def _hinted_load(ptrs, mask, other, HINT: tl.constexpr):
    # A load with a cache hint (DECODE_PATHS["cache_hints"], for benchmarks): "" none, "cg"
    # cache in L2 only (not L1), "ef" / "el" evict first / last. The GEMVs stream each weight
    # byte once while every program re-reads the same x. Measured on an H200 (session 10,
    # kernels_gpu.py --fp-gemv --hints): weights evict-first + x evict-last cut the 4-row int8
    # GEMVs at K <= 4096 by 4-16% (12288x4096 17.15 -> 16.12 us) but slowed 4096x11008 (17.01
    # -> 18.67); the 2-row tiles that replaced them lost 1-3% with the hints; fp16 GEMVs moved
    # under 1%. Off by default.
    if HINT == "cg":
        return tl.load(ptrs, mask=mask, other=other, cache_modifier=".cg")
    elif HINT == "ef":
        return tl.load(ptrs, mask=mask, other=other, eviction_policy="evict_first")
    elif HINT == "el":
        return tl.load(ptrs, mask=mask, other=other, eviction_policy="evict_last")
    else:
        return tl.load(ptrs, mask=mask, other=other)


@triton.jit
def _w8_gemv_load(w_ptrs, x_ptrs, n_mask, kk, K, k0, MASK_K: tl.constexpr,
                  W_HINT: tl.constexpr = "", X_HINT: tl.constexpr = ""):
    if MASK_K:
        k_mask = (kk < K - k0)[None, :, :]
        w = _hinted_load(w_ptrs, n_mask[:, None, None] & k_mask, 0, W_HINT)
        x = _hinted_load(x_ptrs, k_mask, 0.0, X_HINT)
    else:
        w = _hinted_load(w_ptrs, n_mask[:, None, None], 0, W_HINT)
        x = _hinted_load(x_ptrs, None, None, X_HINT)
    return w, x


@triton.jit
def _weight_rows(pid_n, N, BLOCK_N: tl.constexpr, GATED: tl.constexpr):
    # The weight rows one program reads: BLOCK_N consecutive ones, or (GATED, a packed
    # [gate | up] weight of N rows) BLOCK_N / 2 gate rows and the up rows N / 2 further on,
    # so that the epilogue holds each output's gate and up sums.
    r = tl.arange(0, BLOCK_N)
    if GATED:
        o = pid_n * (BLOCK_N // 2) + r % (BLOCK_N // 2)
        offs_n = o + (r // (BLOCK_N // 2)) * (N // 2)
        n_mask = o < N // 2
    else:
        offs_n = pid_n * BLOCK_N + r
        n_mask = offs_n < N
    return offs_n, n_mask


@triton.jit
def _pdl_start(w_ptr, offs_n, n_mask, stride_wn, stride_wk, K, BLOCK_K: tl.constexpr,
               W_LINE: tl.constexpr, PDL: tl.constexpr, PF: tl.constexpr):
    # With PDL (kernels/_triton.py): before waiting for the kernel before, ask L2 for the first
    # two K-tiles of this program's weight rows (W_LINE elements = one 128-byte line; weights
    # are read-only, so this may overlap that kernel), then wait and let the next one launch.
    if PDL and PF:
        rows = tl.where(n_mask, offs_n, 0)
        k = tl.minimum(tl.arange(0, (2 * BLOCK_K + W_LINE - 1) // W_LINE) * W_LINE, K - 1)
        prefetch_l2(w_ptr + rows[:, None] * stride_wn + k[None, :] * stride_wk)
    pdl_wait_then_release(PDL)


@triton.jit
def _act_store(y, y_ptr, offs_m, m_mask, pid_n, N, stride_ym, stride_yn,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACT: tl.constexpr):
    # y [BLOCK_M, BLOCK_N] fp32 (scaled, bias added) -> act(y) into y_ptr [M, N], or for
    # "silu_gate" silu(gate) * up into [M, N / 2] (y's columns: BLOCK_N / 2 gates, then ups)
    if ACT == "silu_gate":
        y3 = tl.reshape(y, (BLOCK_M, 2, BLOCK_N // 2))
        half = tl.arange(0, 2)[None, :, None]
        g = tl.sum(tl.where(half == 0, y3, 0.0), axis=1)
        u = tl.sum(tl.where(half == 1, y3, 0.0), axis=1)
        out = g * tl.sigmoid(g) * u
        offs_o = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        o_mask = offs_o < N // 2
    else:
        out = _act(y, ACT)
        offs_o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        o_mask = offs_o < N
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_o[None, :] * stride_yn,
             out.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & o_mask[None, :])


@triton.jit
def _w8_gemv_kernel(
    x_ptr,        # [M, K] activations, fp16 / bf16 / fp32
    w_ptr,        # [N, K] int8
    s_ptr,        # [G, C] scales, fp32 or fp16
    b_ptr,        # [N] bias (unused unless HAS_BIAS)
    y_ptr,        # [M, N] output
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sg, stride_sc, stride_ym, stride_yn,
    rows_per_group,
    m_bucket,                 # autotune key only
    COL_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    FAST_CVT: tl.constexpr,   # PRMT-based int8 -> fp32 (inline PTX; off under the interpreter)
    ACT: tl.constexpr,        # epilogue: "identity", an activation, or "silu_gate" (y [M, N/2])
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    VEC: tl.constexpr,        # elements per chunk (8: one 8-byte load of w, one 16-byte of x)
    PREFETCH: tl.constexpr,   # load the next K-tile before converting the current one
    PDL: tl.constexpr = False, PF: tl.constexpr = False, W_LINE: tl.constexpr = 128,  # _pdl_start
    W_HINT: tl.constexpr = "", X_HINT: tl.constexpr = "",   # _hinted_load
):
    # M = 1 weight-only GEMV on CUDA cores (grid axis 1 walks the rows of x, each re-reading w,
    # for tests and M > 1 configs). The tile is [BLOCK_N, BLOCK_K / VEC, VEC] and x is loaded
    # through a pointer tensor of the same shape (row stride 0), so that Triton gives x and w the
    # same layout: no shared-memory layout conversion (and no barrier) in the K loop.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    x_ptr += pid_m * stride_xm
    y_ptr += pid_m * stride_ym
    offs_n, n_mask = _weight_rows(pid_n, N, BLOCK_N, ACT == "silu_gate")
    _pdl_start(w_ptr, offs_n, n_mask, stride_wn, stride_wk, K, BLOCK_K, W_LINE, PDL, PF)
    kc = tl.arange(0, BLOCK_K // VEC) * VEC                               # [KC] chunk starts
    kk = kc[:, None] + tl.arange(0, VEC)[None, :]                          # [KC, VEC]
    w_ptrs = w_ptr + offs_n[:, None, None] * stride_wn + kk[None, :, :] * stride_wk
    x_ptrs = x_ptr + (offs_n[:, None, None] * 0 + kk[None, :, :]) * stride_xk
    s_rows = s_ptr + (offs_n // rows_per_group) * stride_sg                # [BLOCK_N]
    acc = tl.zeros((BLOCK_N, BLOCK_K // VEC), dtype=tl.float32)
    if PREFETCH:
        w, x = _w8_gemv_load(w_ptrs, x_ptrs, n_mask, kk, K, 0, not EVEN_K, W_HINT, X_HINT)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            w_ptrs += BLOCK_K * stride_wk
            x_ptrs += BLOCK_K * stride_xk
            w_next, x_next = _w8_gemv_load(w_ptrs, x_ptrs, n_mask, kk, K, k0, not EVEN_K,
                                           W_HINT, X_HINT)
            acc = _w8_gemv_step(acc, w, x, s_rows, n_mask, kc, k0 - BLOCK_K, K, stride_sc,
                                COL_GROUP, VEC, FAST_CVT)
            w = w_next
            x = x_next
        k_last = ((K - 1) // BLOCK_K) * BLOCK_K
        acc = _w8_gemv_step(acc, w, x, s_rows, n_mask, kc, k_last, K, stride_sc,
                            COL_GROUP, VEC, FAST_CVT)
    else:
        for k0 in range(0, K, BLOCK_K):
            w, x = _w8_gemv_load(w_ptrs, x_ptrs, n_mask, kk, K, k0, not EVEN_K, W_HINT,
                                 X_HINT)
            acc = _w8_gemv_step(acc, w, x, s_rows, n_mask, kc, k0, K, stride_sc,
                                COL_GROUP, VEC, FAST_CVT)
            w_ptrs += BLOCK_K * stride_wk
            x_ptrs += BLOCK_K * stride_xk
    y = tl.sum(acc, axis=1)                                                # [BLOCK_N]
    if COL_GROUP == 0:
        y = y * tl.load(s_rows, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    one = tl.arange(0, 1)                                  # this program's row of x (y_ptr moved)
    _act_store(y[None, :], y_ptr, one, one < 1, pid_n, N, stride_ym, stride_yn, 1, BLOCK_N, ACT)


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in grouped launch order (Triton tutorial 03): GROUP_M row tiles walk the
    same columns of w together, so those columns are read from L2, not HBM, after the first."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


@triton.jit
def _linear_epilogue(acc, y_ptr, b_ptr, s_rows, offs_m, offs_n, m_mask, n_mask, stride_ym,
                     stride_yn, ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] fp32 -> y: times the per-row scale (ROW_SCALE), plus the bias."""
    if ROW_SCALE:
        acc = acc * tl.load(s_rows, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _linear_kernel(
    x_ptr,        # [M, K] activations, fp16 / bf16 / fp32
    w_ptr,        # [N, K] weight: int8 (QUANT) or the activations' dtype
    s_ptr,        # [G, C] scales, fp32 or fp16 (unused unless QUANT)
    b_ptr,        # [N] bias (unused unless HAS_BIAS)
    y_ptr,        # [M, N] output, the activations' dtype
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sg, stride_sc, stride_ym, stride_yn,
    rows_per_group,           # N // G: output rows that share a row of scales
    m_bucket,                 # autotune key only (M rounded up to a power of two)
    QUANT: tl.constexpr,      # w is int8 and is dequantized with s
    COL_GROUP: tl.constexpr,  # K // C, or 0 when C == 1 (scale applied after the K loop)
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 activations, else "tf32" (ignored for 16-bit)
    EVEN_K: tl.constexpr,     # K % BLOCK_K == 0: no masks along K
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,    # tiles of M per group in the launch order (L2 reuse of w)
    SWAP_AB: tl.constexpr,    # accumulate y.T = w @ x.T (weight tile as the first MMA operand)
    FAST_CVT: tl.constexpr = False,  # PRMT-based int8 conversion (inline PTX; not interpreted)
    PDL: tl.constexpr = False, PF: tl.constexpr = False, W_LINE: tl.constexpr = 64,  # _pdl_start
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    _pdl_start(w_ptr, offs_n, n_mask, stride_wn, stride_wk, K, BLOCK_K, W_LINE, PDL, PF)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk  # [BLOCK_N, BLOCK_K]
    s_rows = s_ptr + (offs_n // rows_per_group) * stride_sg                      # [BLOCK_N]

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_mask[:, None], other=0)
        else:
            k_mask = offs_k < K - k0
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0)
        if QUANT:
            if COL_GROUP == 0:      # scale is per row: applied to acc after the loop
                w = _i8_to(w, x.dtype, FAST_CVT)
            elif COL_GROUP % BLOCK_K == 0:  # the tile lies in one column group: one scale per row
                s = tl.load(s_rows + (k0 // COL_GROUP) * stride_sc, mask=n_mask, other=0.0)
                w = _i8_to(w, x.dtype, FAST_CVT)   # exact; the scale multiplies this tile's dot
            else:                   # odd group widths: gather a scale per element
                cols = (k0 + offs_k) // COL_GROUP
                s = tl.load(s_rows[:, None] + cols[None, :] * stride_sc,
                            mask=n_mask[:, None] & (offs_k < K - k0)[None, :], other=0.0)
                w = (_i8_to(w, tl.float32, FAST_CVT) * s.to(tl.float32)).to(x.dtype)
        if QUANT and COL_GROUP != 0 and COL_GROUP % BLOCK_K == 0:
            # int8 values times x exactly in the MMA, then the tile's partial sums times the
            # column group's scale (fp32), as the dequantized weight would give
            if SWAP_AB:
                part = tl.dot(w, tl.trans(x), input_precision=DOT_PRECISION)
                acc += part * s.to(tl.float32)[:, None]
            else:
                part = tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
                acc += part * s.to(tl.float32)[None, :]
        elif SWAP_AB:
            acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if SWAP_AB:
        acc = tl.trans(acc)                                   # [BLOCK_M, BLOCK_N]
    _linear_epilogue(acc, y_ptr, b_ptr, s_rows, offs_m, offs_n, m_mask, n_mask, stride_ym,
                     stride_yn, QUANT and COL_GROUP == 0, HAS_BIAS)


@triton.jit
def _gemv_load(x_ptrs, w_ptrs, m_mask, n_mask, offs_k, K, k0, MASK_K: tl.constexpr,
               W_HINT: tl.constexpr = "", X_HINT: tl.constexpr = ""):
    # x [BLOCK_M, BLOCK_K], w [BLOCK_N, BLOCK_K] at K offset k0 (pointers already advanced)
    if MASK_K:
        k_mask = offs_k < K - k0
        x = _hinted_load(x_ptrs, m_mask[:, None] & k_mask[None, :], 0.0, X_HINT)
        w = _hinted_load(w_ptrs, n_mask[:, None] & k_mask[None, :], 0, W_HINT)
    else:
        x = _hinted_load(x_ptrs, m_mask[:, None], 0.0, X_HINT)
        w = _hinted_load(w_ptrs, n_mask[:, None], 0, W_HINT)
    return x, w


@triton.jit
def _gemv_accumulate(acc, x, w, s_rows, n_mask, offs_k, K, k0, stride_sc,
                     QUANT: tl.constexpr, COL_GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
                     REDUCE_K: tl.constexpr):
    # acc += x * dequant(w) for the K-tile at k0: acc is [BLOCK_M, BLOCK_N, BLOCK_K] partial
    # products, or with REDUCE_K [BLOCK_M, BLOCK_N] sums (reduced over the tile every step)
    w = w.to(tl.float32)
    if QUANT:
        if COL_GROUP == 0:
            pass                      # per-row scale, applied after the loop
        elif COL_GROUP % BLOCK_K == 0:
            s = tl.load(s_rows + (k0 // COL_GROUP) * stride_sc, mask=n_mask, other=0.0)
            w = w * s.to(tl.float32)[:, None]
        else:
            cols = (k0 + offs_k) // COL_GROUP
            s = tl.load(s_rows[:, None] + cols[None, :] * stride_sc,
                        mask=n_mask[:, None] & (offs_k < K - k0)[None, :], other=0.0)
            w = w * s.to(tl.float32)
    prod = w[None, :, :] * x.to(tl.float32)[:, None, :]
    if REDUCE_K:
        return acc + tl.sum(prod, axis=2)
    else:
        return acc + prod


@triton.jit
def _gemv_kernel(
    x_ptr,        # [M, K] activations, M <= BLOCK_M
    w_ptr,        # [N, K] weight: int8 (QUANT) or the activations' dtype
    s_ptr,        # [G, C] scales (unused unless QUANT)
    b_ptr,        # [N] bias (unused unless HAS_BIAS)
    y_ptr,        # [M, N] output
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sg, stride_sc, stride_ym, stride_yn,
    rows_per_group,
    m_bucket,                 # autotune key only
    QUANT: tl.constexpr, COL_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    ACT: tl.constexpr,        # epilogue: "identity", an activation, or "silu_gate" (y [M, N/2])
    BLOCK_M: tl.constexpr,    # power of two >= M (1, 2 or 4): rows of x
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr,   # issue the next K-tile's loads before using the current one
    REDUCE_K: tl.constexpr,   # sum over each K-tile at once: fewer registers, so bigger tiles
    PDL: tl.constexpr = False, PF: tl.constexpr = False, W_LINE: tl.constexpr = 64,  # _pdl_start
    W_HINT: tl.constexpr = "", X_HINT: tl.constexpr = "",   # _hinted_load
):
    # No tensor cores: each program streams a [BLOCK_N, K] strip of w and keeps per-lane partial
    # products in a [BLOCK_M, BLOCK_N, BLOCK_K] fp32 tile, reduced over K once at the end; that
    # costs 4 bytes of registers per int8 weight byte in flight, so REDUCE_K instead reduces each
    # tile as it goes (a few shuffles a step) and affords larger tiles. PREFETCH double-buffers
    # the tiles in registers, so that a program has its next loads in flight while it converts
    # and multiplies (the loads feed no tl.dot, so Triton's software pipelining does not apply).
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n, n_mask = _weight_rows(pid_n, N, BLOCK_N, ACT == "silu_gate")
    _pdl_start(w_ptr, offs_n, n_mask, stride_wn, stride_wk, K, BLOCK_K, W_LINE, PDL, PF)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk  # [BLOCK_N, BLOCK_K]
    s_rows = s_ptr + (offs_n // rows_per_group) * stride_sg                      # [BLOCK_N]
    if REDUCE_K:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    if PREFETCH:
        x, w = _gemv_load(x_ptrs, w_ptrs, m_mask, n_mask, offs_k, K, 0, True, W_HINT, X_HINT)
        for k0 in range(BLOCK_K, K + BLOCK_K, BLOCK_K):
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
            x_next, w_next = _gemv_load(x_ptrs, w_ptrs, m_mask, n_mask, offs_k, K, k0, True,
                                        W_HINT, X_HINT)
            acc = _gemv_accumulate(acc, x, w, s_rows, n_mask, offs_k, K, k0 - BLOCK_K,
                                   stride_sc, QUANT, COL_GROUP, BLOCK_K, REDUCE_K)
            x = x_next
            w = w_next
    else:
        for k0 in range(0, K, BLOCK_K):
            x, w = _gemv_load(x_ptrs, w_ptrs, m_mask, n_mask, offs_k, K, k0, not EVEN_K,
                              W_HINT, X_HINT)
            acc = _gemv_accumulate(acc, x, w, s_rows, n_mask, offs_k, K, k0, stride_sc,
                                   QUANT, COL_GROUP, BLOCK_K, REDUCE_K)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
    if REDUCE_K:
        y = acc
    else:
        y = tl.sum(acc, axis=2)                                           # [BLOCK_M, BLOCK_N]
    if QUANT:
        if COL_GROUP == 0:
            y = y * tl.load(s_rows, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    _act_store(y, y_ptr, offs_m, m_mask, pid_n, N, stride_ym, stride_yn, BLOCK_M, BLOCK_N, ACT)


@triton.jit
def _dequant_kernel(
    q_ptr,        # [N, K] int8
    s_ptr,        # [G, C] scales
    w_ptr,        # [N, K] output in the activations' dtype (contiguous)
    N, K, stride_qn, stride_qk, stride_sg, stride_sc,
    rows_per_group,              # N // G
    COL_GROUP: tl.constexpr,     # K // C, or 0 when C == 1
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    k0 = tl.program_id(1) * BLOCK_K
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    mask = n_mask[:, None] & (offs_k < K)[None, :]
    q = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :] * stride_qk, mask=mask)
    s_rows = s_ptr + (offs_n // rows_per_group) * stride_sg                       # [BLOCK_N]
    if COL_GROUP == 0:
        s = tl.load(s_rows, mask=n_mask, other=0.0)[:, None]
    elif COL_GROUP % BLOCK_K == 0:      # the tile lies in one column group
        s = tl.load(s_rows + (k0 // COL_GROUP) * stride_sc, mask=n_mask, other=0.0)[:, None]
    else:
        s = tl.load(s_rows[:, None] + (offs_k // COL_GROUP)[None, :] * stride_sc, mask=mask)
    tl.store(w_ptr + offs_n[:, None] * K + offs_k[None, :],
             (q.to(tl.float32) * s.to(tl.float32)).to(w_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- dispatch

INT8_GEMV_MAX_M = 1             # int8, M = 1: DECODE_PATHS["int8_m1"] (_w8_gemv_kernel)
# int8 -> float conversion by PRMT byte permutes (inline PTX) instead of I2F, which issues at a
# quarter rate and bounds the M = 1 GEMV on an H200 (1.05x cuBLAS fp16 at 4096x4096 with I2F,
# 1.8x with PRMT on an H100; exact, checked by the GPU tests). DSINFER_INT8_FAST_CVT=0: I2F.
FAST_CVT = os.environ.get("DSINFER_INT8_FAST_CVT", "1") == "1"
GEMV_MAX_M = 4                  # fp16/bf16 weights, M <= 4: _gemv_kernel
DECODE_MAX_M = 16               # M <= 16: _linear_kernel with the decode tiles
# M >= this: dequantize w to the activations' dtype (one pass) and run cuBLAS. Measured on an
# H200 (Llama-7B shapes): the fused kernel reaches 0.55-0.65x cuBLAS at M = 1024-4096 (no warp
# specialization of the dequant) and is no faster than dequant + cuBLAS at M = 256, while the
# dequant pass costs a few percent of a large GEMM (0.92-0.96x cuBLAS at M = 4096).
PREFILL_DEQUANT_MIN_M = 256

# (BLOCK_M, BLOCK_N, BLOCK_K, SWAP_AB, num_warps, num_stages). Decode tiles are narrow in N so that
# even N = 2048 (a TP-2 slice) gives over a hundred programs streaming w, and long in K: the cost
# per K-step (x tile, MMA, barriers) is what limits them, not the bytes.
_DECODE_TILES = [
    (16, 32, 512, False, 4, 3),
    (16, 16, 1024, False, 4, 2),
    (16, 32, 256, False, 4, 4),
    (16, 128, 128, True, 4, 3),
    (16, 16, 128, False, 4, 6),
    (16, 32, 128, False, 4, 5),
    (16, 64, 128, False, 4, 4),
]
_PREFILL_TILES = [         # 16 < M < PREFILL_DEQUANT_MIN_M
    (128, 128, 64, False, 4, 4),
    (128, 128, 64, True, 8, 4),
    (64, 128, 64, False, 4, 4),
    (64, 64, 128, False, 4, 4),
    (32, 64, 256, False, 4, 3),
]
# _gemv_kernel candidates per BLOCK_M: (BLOCK_N, BLOCK_K, num_warps, PREFETCH, REDUCE_K), wide
# K-tiles first, then 128-wide ones for 128-column scale groups; _tuned_gemv keeps the first six
# whose BLOCK_K fits the column groups. Registers a thread (ptxas, sm_90) stay under ~200, so two
# to four programs share an SM. Measured on an H200 (M = 1, non-prefetch, no REDUCE_K): best
# (8, 1024, 4) for per-row scales and (8, 128, 4) for 128-wide groups; the PREFETCH / REDUCE_K
# variants came after that run and compete in the autotuner unmeasured.
_GEMV_TILES = {
    1: [(8, 1024, 4, False, False), (16, 512, 4, False, True), (32, 256, 4, False, True),
        (16, 512, 4, True, True), (16, 1024, 4, False, True), (8, 512, 4, True, False),
        (8, 128, 4, False, False), (16, 128, 4, True, False), (32, 128, 4, True, True),
        (64, 128, 4, False, True), (128, 128, 8, True, True), (16, 128, 4, False, False),
        # 4-row tiles: for N that 8 rows split unevenly over the SMs (_balanced_rows)
        (4, 1024, 4, False, False), (4, 2048, 4, False, False), (4, 512, 4, False, False)],
    2: [(4, 512, 4, False, False), (2, 1024, 4, False, False), (16, 512, 4, False, True),
        (16, 512, 4, True, True), (32, 256, 4, False, True), (8, 256, 4, False, False),
        (8, 128, 4, False, False), (16, 128, 4, True, False), (32, 128, 4, False, True),
        (4, 128, 4, False, False), (16, 128, 4, False, False), (32, 128, 4, True, True)],
    4: [(4, 512, 4, False, False), (2, 1024, 4, False, False), (8, 256, 4, False, False),
        (16, 512, 4, False, True), (16, 512, 4, True, True), (4, 512, 4, True, False),
        (4, 128, 4, False, False), (8, 128, 4, False, False), (16, 128, 4, True, True),
        (4, 128, 4, True, False), (16, 128, 4, False, False), (2, 128, 4, False, False)],
}
# _w8_gemv_kernel candidates (M = 1): (BLOCK_N, BLOCK_K, num_warps, PREFETCH)
_W8_GEMV_TILES = [(8, 1024, 4, False), (16, 512, 4, False), (4, 1024, 4, False),
                  (8, 512, 4, False), (16, 1024, 8, False), (4, 2048, 8, False),
                  # prefetching tiles: the next K-tile's loads are in flight while this one
                  # converts (in the tuner's set for session 5's H100 runs; which tile it
                  # picked per shape was not recorded)
                  (8, 1024, 4, True), (8, 512, 4, True), (8, 2048, 8, False)]
_INTERPRET_W8_GEMV_TILE = (16, 32, 1, True)
_INTERPRET_TILE = (16, 16, 32, False, 1, 1)   # small: the interpreter runs programs one by one
_INTERPRET_GEMV_TILE = (16, 32, 1, False, False)


def _max_block_k(col_group: int) -> int:
    """Largest BLOCK_K that keeps a K-tile inside one column group (no per-element scales)."""
    if col_group == 0:
        return 1 << 30
    return col_group & -col_group   # largest power of two dividing the group width


def _even_k(args):
    return args["K"] % args["BLOCK_K"] == 0


@functools.lru_cache(maxsize=None)
def _tuned(decode: bool, max_bk: int):
    tiles = _DECODE_TILES if decode else _PREFILL_TILES
    fits = [t for t in tiles if t[2] <= max_bk] or [t[:2] + (max(16, min(max_bk, 64)),) + t[3:]
                                                    for t in tiles[:1]]
    configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SWAP_AB=swap,
                                  GROUP_M=1 if decode else 8), num_warps=w, num_stages=st)
               for bm, bn, bk, swap, w, st in fits]
    heur = triton.heuristics({"EVEN_K": _even_k})(_linear_kernel)
    return triton.autotune(configs=configs, key=["m_bucket", "N", "K"])(heur)


@functools.lru_cache(maxsize=None)
def _tuned_w8_gemv(rows: tuple = ()):
    fits = [t for t in _W8_GEMV_TILES if t[0] in rows] or _W8_GEMV_TILES
    configs = [triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk, PREFETCH=pf), num_warps=w, num_stages=1)
               for bn, bk, w, pf in fits]
    heur = triton.heuristics({"EVEN_K": _even_k})(_w8_gemv_kernel)
    return triton.autotune(configs=configs, key=["N", "K", "COL_GROUP"])(heur)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _balanced_rows(N: int, sms: int) -> tuple:
    """The GEMV BLOCK_N values whose cdiv(N, BLOCK_N) programs spread evenly over the SMs.
    A decode GEMV is bandwidth-bound and lasts as long as its busiest SM: at N = 2560 (GPT-Neo-
    2.7B's o and fc_out) 8-row programs put 2.4 on an average H100 SM and 3 on the busiest, and
    the GEMVs reached 79% of copy bandwidth against 96% for Llama-7B's shapes (profile, H100)."""
    choices = sorted({t[0] for tiles in _GEMV_TILES.values() for t in tiles}
                     | {t[0] for t in _W8_GEMV_TILES})
    even = []
    for bn in choices:
        per_sm = triton.cdiv(N, bn) / sms
        if -(-per_sm // 1) / per_sm <= 1.12:
            even.append(bn)
    return tuple(even) or (min(choices),)


def _even_rows(N: int, x: torch.Tensor) -> tuple:
    """The GEMV row counts to choose from at N rows: _balanced_rows where DECODE_PATHS says
    so, else () (any)."""
    if not DECODE_PATHS["balanced_rows"]:
        return ()
    return _balanced_rows(N, _sm_count(x.device.index or 0))


@functools.lru_cache(maxsize=None)
def _tuned_gemv(block_m: int, max_bk: int, rows: tuple = ()):
    fits = [t for t in _GEMV_TILES[block_m] if t[1] <= max_bk]
    fits = ([t for t in fits if t[0] in rows] or fits)[:6] or [(16, 16, 4, False, False)]
    configs = [triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk, PREFETCH=pf, REDUCE_K=rk),
                             num_warps=w, num_stages=1) for bn, bk, w, pf, rk in fits]
    heur = triton.heuristics({"EVEN_K": _even_k})(_gemv_kernel)
    return triton.autotune(configs=configs, key=["m_bucket", "N", "K"])(heur)


# M = 1 tiles by rule rather than by Triton's autotuner, which times one kernel alone (idle GPU,
# launch latency in the timing) and there ranked tiles differently from a decode graph, where
# each layer's weight streams right behind the previous kernel. Measured in graph conditions
# (bench/kernels_gpu.py --fp-gemv: 32 weights of a shape back to back, H200, 16 GPT-Neo-2.7B
# and Llama-7B projections at TP 1 and 2): fp16 sum of us per call, best tile per shape 236.7,
# these rules 240.9, the autotuner 259.6 (GPT-Neo's 7680x2560 12.9 vs 16.0 us, 10240x2560 +
# GELU 15.1 vs 20.2 us); int8 per-channel 178.7 / 180.1 / 189.2 (6144x4096 10.3 vs 16.0 us).
# Decode, H200, same process (profile_decode_gpu.py --ab m1_tile): GPT-Neo-2.7B fp16 2.038 vs
# 2.167 ms/token, Llama-7B fp16 3.885 vs 3.929, Llama-7B int8 2.683 vs 2.681.

def _gemv_m1_tile(N: int, K: int, gated: bool = False) -> tuple:
    """The fp16/bf16 _gemv_kernel tile at M = 1: the widest K-tile (<= 1024) dividing K, else
    1024 (one masked tail), over 2-row programs for N < 3000 (GPT-Neo's 2560-row projections:
    many small programs, short tails), 8 rows up to N = 4096, 4 rows above. (Every height is
    even, so a packed [gate | up] weight (gated) pairs its rows as it needs.)"""
    bk = next((b for b in (1024, 512) if K % b == 0), 1024)
    bn = 2 if N < 3000 else (8 if N <= 4096 else 4)
    return (bn, bk, 4, False, False)


def _w8_gemv_m1_tile(N: int, K: int, gated: bool = False) -> tuple:
    """The _w8_gemv_kernel tile (per-channel or row-group scales): 1- or 2-row programs, twice
    to four times as many as the 4-row tiles of sessions 6-9, each streaming a shorter strip:
    - long rows (K >= 8192) into few outputs (N <= 3072, GPT-Neo's fc_out): 2048-wide K-tiles
      over 8 warps; other long rows (Llama's down projection): one row over 2 warps, unless
      the weight is a packed [gate | up] pair (gated), whose programs need an even height;
    - short rows (K <= 2560) and the widest weights (N >= 16384): 512-wide tiles over 2 warps;
    - else 1024-wide over 4 warps.
    Measured on an H200 (kernels_gpu.py --fp-gemv --int8-only, session 10, us a call, 4-row
    rule -> this): 12288x4096 17.31 -> 15.24, 4096x4096 7.23 -> 6.29, 22016x4096 silu_gate
    27.75 -> 25.26, 4096x11008 17.20 -> 13.83, 2560x10240 12.94 -> 10.15, 7680x2560 9.35 ->
    7.28, 2560x2560 5.87 -> 4.42."""
    if K >= 8192:
        return (2, 2048, 8, False) if N <= 3072 or gated else (1, 1024, 2, False)
    if K <= 2560 or N >= 16384:
        return (2, 512, 2, False)
    return (2, 1024, 4, False)


_M1_RULES = {"gemv": _gemv_m1_tile, "w8_gemv": _w8_gemv_m1_tile}   # kind -> rule


def _rule_tile(kind: str, M: int, N: int, K: int, col_group: int, gated: bool):
    """The tile a rule gives this one-row GEMV (DECODE_PATHS["m1_tile"] == "rule"), or None
    (the autotuner): more rows, tl.dot tiles, and int8 column-group scales are tuned."""
    rule = _M1_RULES.get(kind)
    if rule is None or M != 1 or DECODE_PATHS["m1_tile"] != "rule" or \
            (kind == "w8_gemv" and col_group):
        return None
    return rule(N, K, gated)


# The decode GEMM paths, a table rather than a per-shape timing: one kernel timed alone (do_bench,
# a flush before each call, or back to back over weight copies) ranked them differently from
# the decode graph itself, where each weight streams behind the previous kernel. Measured in
# the graph (bench/profile_decode_gpu.py --ab, Llama-7B shape, batch 1):
# - fp16 "triton" vs "cublas": H200 3.99 vs 4.18 ms a step (4.32 vs 4.55 ms/token); an H100 run
#   with cuBLAS on the 4096x4096 projection only: 5.24 ms, all cuBLAS on another H100: 5.48;
# - int8 M = 1 "gemv" vs "dot" (two H100 profiles, per step of 32 layers; the GEMV run still
#   converted with I2F): 12288- and 22016-row projections ~1.41 (derived) vs 1.78 ms,
#   4096x4096 ~0.28 (8.6 us a call alone) vs 0.71 ms.
# Benchmarks may set other values to compare (the paths are read at each call).
DECODE_PATHS = {"fp_m_le_4": "triton",    # fp16/bf16 weights, rows <= GEMV_MAX_M: gemv | cublas
                "int8_m1": "gemv",        # int8, M = 1: _w8_gemv_kernel | tl.dot decode tiles
                "act_epilogue": True,     # MLP activations in the GEMV epilogue | False: the
                                          # activation kernel after
                "balanced_rows": True,    # autotuned GEMV tiles limited to _balanced_rows(N)
                                          # (GPT-Neo-2.7B fp16 on an H200, 2.329 vs 2.431
                                          # ms/token before the one-row rule below)
                "m1_tile": "rule",        # GEMV tiles at M = 1: _gemv_m1_tile and
                                          # _w8_gemv_m1_tile | "autotune"
                "cache_hints": ("", "")}  # the GEMVs' (weight, x) load hints (_hinted_load)


def _kind(M: int, quant: bool, config=None, path=None) -> str:
    """The kernel _launch runs: "w8_gemv" or "gemv" (both apply an activation in their
    epilogue) or "dot" (_linear_kernel)."""
    if config is not None:
        return {4: "w8_gemv", 5: "gemv", 6: "dot"}[len(config)]
    if quant and M <= INT8_GEMV_MAX_M:
        path = path or ("gemv" if _interpreting() else DECODE_PATHS["int8_m1"])
        return "w8_gemv" if path == "gemv" else "dot"
    return "gemv" if not quant and M <= GEMV_MAX_M else "dot"


def _launch(x2, w, s, bias, y, quant: bool, col_group: int, config=None, path=None,
            act: str = "identity"):
    """x2 [M, K], w [N, K], y [M, N] (or [M, N / 2] for act "silu_gate"). config (a tile
    tuple: 4 entries for _w8_gemv_kernel, 5 for _gemv_kernel, 6 for _linear_kernel) bypasses
    autotuning (benchmarks, tests); path ("gemv" or "dot") forces the int8 M = 1 choice. act
    is applied only by the GEMV kernels (_kind); callers apply it after a "dot" launch."""
    M, K = x2.shape
    N = w.shape[0]
    interp = _interpreting()
    kind = _kind(M, quant, config, path)
    if config is None and not interp:
        config = _rule_tile(kind, M, N, K, col_group, act == "silu_gate")
    pdl_flags = pdl_args(x2)    # PDL (+ the launch option) for the kernels' _pdl_start
    pdl_flags.update(PF=pdl_flags["PDL"] and PDL["prefetch"], W_LINE=128 // w.element_size())
    args = (x2, w, s if s is not None else w, bias if bias is not None else y, y, M, N, K,
            x2.stride(0), x2.stride(1), w.stride(0), w.stride(1),
            s.stride(0) if s is not None else 0, s.stride(1) if s is not None else 0,
            y.stride(0), y.stride(1),
            N // s.shape[0] if s is not None else 1, triton.next_power_of_2(M))
    if kind != "dot" and not interp:
        hints = DECODE_PATHS["cache_hints"]
        pdl_flags.update(W_HINT=hints[0], X_HINT=hints[1])
    if kind == "w8_gemv":
        flags = dict(COL_GROUP=col_group, HAS_BIAS=bias is not None,
                     FAST_CVT=FAST_CVT and not interp, VEC=8, ACT=act, **pdl_flags)
        if config is None and not interp:
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M)
            _tuned_w8_gemv(_even_rows(N, x2))[grid](*args, **flags)
            return
        bn, bk, warps, prefetch = config or _INTERPRET_W8_GEMV_TILE
        _w8_gemv_kernel[(triton.cdiv(N, bn), M)](*args, **flags, EVEN_K=K % bk == 0, BLOCK_N=bn,
                                               BLOCK_K=bk, PREFETCH=prefetch, num_warps=warps,
                                               num_stages=1)
        return
    flags = dict(QUANT=quant, COL_GROUP=col_group, HAS_BIAS=bias is not None, **pdl_flags)
    if kind == "gemv":
        block_m = triton.next_power_of_2(M)
        if config is None and not interp:
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
            rows = _even_rows(N, x2)
            _tuned_gemv(block_m, _max_block_k(col_group), rows)[grid](*args, **flags, ACT=act,
                                                                      BLOCK_M=block_m)
            return
        bn, bk, warps, prefetch, reduce_k = config or _INTERPRET_GEMV_TILE
        _gemv_kernel[(triton.cdiv(N, bn),)](*args, **flags, ACT=act, EVEN_K=K % bk == 0,
                                           BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk,
                                           PREFETCH=prefetch, REDUCE_K=reduce_k, num_warps=warps)
        return
    flags["DOT_PRECISION"] = "ieee" if x2.dtype == torch.float32 else "tf32"
    flags["FAST_CVT"] = quant and FAST_CVT and not interp
    decode = M <= DECODE_MAX_M
    if config is None and not interp:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _tuned(decode, _max_block_k(col_group))[grid](*args, **flags)
        return
    bm, bn, bk, swap, warps, stages = config or _INTERPRET_TILE
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _linear_kernel[grid](*args, **flags, EVEN_K=K % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                         GROUP_M=1 if decode else 8, SWAP_AB=swap, num_warps=warps,
                         num_stages=stages)


# ----------------------------------------------------------------------------- wrappers

def _check_x(x: torch.Tensor, k: int, what: str):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{what}: activations must be fp16, bf16 or fp32, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"{what}: x has {x.shape[-1]} input features, the weight {k}")


def _prepare(x, n, bias, out, what, n_out=None):
    x2 = x.reshape(-1, x.shape[-1])
    if bias is not None and (bias.shape != (n,) or bias.device != x.device):
        raise ValueError(f"{what}: bias must be [{n}] on {x.device}, got {tuple(bias.shape)} "
                         f"on {bias.device}")
    shape = (*x.shape[:-1], n if n_out is None else n_out)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    elif out.shape != shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"{what}: out must be a contiguous {x.dtype} tensor of shape {shape}")
    return x2, out


EPILOGUES = ACTIVATIONS + ("silu_gate",)


def _check_act(act: Optional[str], n: int, what: str) -> str:
    """None -> "identity"; "silu_gate" (a packed [gate | up] weight) needs an even N."""
    act = "identity" if act is None else act
    if act not in EPILOGUES:
        raise ValueError(f"{what}: unknown act {act!r}; known: {', '.join(EPILOGUES)}")
    if act == "silu_gate" and n % 2:
        raise ValueError(f"{what}: act='silu_gate' needs a packed [gate | up] weight (even N), "
                         f"got N = {n}")
    return act


def _finish(y: torch.Tensor, act: str, out: Optional[torch.Tensor]) -> torch.Tensor:
    """act on a finished y [..., N], for the paths whose kernel has no epilogue for it."""
    if act != "identity":
        y = silu_mul(y) if act == "silu_gate" else bias_act(y, None, act)
    if out is None:
        return y
    if out.shape != y.shape or out.dtype != y.dtype:
        raise ValueError(f"out must be a {y.dtype} tensor of shape {tuple(y.shape)}")
    return out.copy_(y)


def _run(x, w, s, bias, out, quant: bool, col_group: int, config, act: str, what: str):
    """The Triton launch over x's rows: act in the GEMV kernels' epilogue where one of them
    runs (_kind), else after the GEMM."""
    n = w.shape[0]
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    fused = act == "identity" or (DECODE_PATHS["act_epilogue"]
                                  and _kind(M, quant, config) != "dot")
    n_out = n // 2 if act == "silu_gate" and fused else n
    x2, y = _prepare(x, n, bias, out if fused else None, what, n_out)
    if x2.shape[0]:
        _launch(x2, w, s, bias, y.view(-1, n_out), quant, col_group, config,
                act=act if fused else "identity")
    return y if fused else _finish(y, act, out)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                config=None, act: Optional[str] = None) -> torch.Tensor:
    """act(x [..., K] @ dequant(q [N, K] int8, scale [G, C]).T (+ bias [N])) in x's dtype:
    [..., N], or [..., N / 2] for act "silu_gate" (silu(gate) * up of a packed [gate | up]
    weight). act: None or one of EPILOGUES; the M = 1 GEMV applies it in its epilogue.

    G must divide N and C must divide K (the quantizer's geometry). q may be any strided view
    (e.g. the .t() of a Conv1D's [K, N] storage), but a row-major [N, K] q streams fastest."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"int8_linear: q must be a 2-D int8 [N, K] tensor, got {q.dtype} "
                        f"{tuple(q.shape)}")
    n, k = q.shape
    _check_x(x, k, "int8_linear")
    act = _check_act(act, n, "int8_linear")
    if scale.dim() != 2 or n % scale.shape[0] or k % scale.shape[1]:
        raise ValueError(f"int8_linear: scale {tuple(scale.shape)} does not tile the weight "
                         f"[{n}, {k}] into [groups, col_groups] blocks")
    if not scale.dtype.is_floating_point:
        raise TypeError(f"int8_linear: scale must be fp32 or fp16, got {scale.dtype}")
    if not (q.device == scale.device == x.device):
        raise ValueError(f"int8_linear: x, q and scale must share a device, got {x.device}, "
                         f"{q.device}, {scale.device}")
    if not _use_triton(x):
        return _finish(int8_linear_ref(x, q, scale, bias), act, out)
    rows = x.numel() // k if k else 0
    if rows >= PREFILL_DEQUANT_MIN_M and config is None:
        x2, y = _prepare(x, n, bias, out if act == "identity" else None, "int8_linear")
        w = dequantize(q, scale, x.dtype)                     # one pass, then cuBLAS
        if bias is None:
            torch.mm(x2, w.t(), out=y.view(-1, n))
        else:
            torch.addmm(bias.to(x.dtype), x2, w.t(), out=y.view(-1, n))
        return y if act == "identity" else _finish(y, act, out)
    col_group = 0 if scale.shape[1] == 1 else k // scale.shape[1]
    return _run(x, q, scale, bias, out, True, col_group, config, act, "int8_linear")


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float16
               ) -> torch.Tensor:
    """(q int8 [N, K], scale [G, C]) -> w [N, K] in dtype, one pass (dequantize_ref's maths)."""
    if q.dtype != torch.int8 or q.dim() != 2 or scale.dim() != 2 or q.shape[0] % scale.shape[0] \
            or q.shape[1] % scale.shape[1]:
        raise ValueError(f"dequantize: need int8 q [N, K] and scale [G, C] tiling it, got "
                         f"{q.dtype} {tuple(q.shape)} and {tuple(scale.shape)}")
    if not _use_triton(q):
        return dequantize_ref(q, scale, dtype)
    n, k = q.shape
    w = torch.empty((n, k), dtype=dtype, device=q.device)
    col_group = 0 if scale.shape[1] == 1 else k // scale.shape[1]
    BLOCK_N, BLOCK_K = (16, 32) if _interpreting() else (32, min(256, _max_block_k(col_group)))
    BLOCK_K = max(BLOCK_K, 16)
    if w.numel():
        _dequant_kernel[(triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K))](
            q, scale, w, n, k, q.stride(0), q.stride(1), scale.stride(0), scale.stride(1),
            n // scale.shape[0], COL_GROUP=col_group, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
            num_warps=4)
    return w


def gemv(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
         out: Optional[torch.Tensor] = None, config=None, act: Optional[str] = None
         ) -> torch.Tensor:
    """act(x [..., K] @ w [N, K].T (+ bias)) for fp16/bf16/fp32 weights of x's dtype; act as
    int8_linear's (the GEMV kernel, at most GEMV_MAX_M rows, applies it in its epilogue).

    The Triton kernel runs for decode (at most 16 rows of x); larger M goes to cuBLAS (F.linear)."""
    if w.dim() != 2 or w.dtype != x.dtype:
        raise TypeError(f"gemv: w must be a 2-D [N, K] tensor of x's dtype {x.dtype}, got "
                        f"{w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    _check_x(x, k, "gemv")
    act = _check_act(act, n, "gemv")
    if w.device != x.device:
        raise ValueError(f"gemv: x on {x.device}, w on {w.device}")
    rows = x.numel() // k if k else 0
    if not _use_triton(x) or (rows > DECODE_MAX_M and config is None and not _interpreting()):
        return _finish(linear_ref(x, w, bias), act, out)
    return _run(x, w, None, bias, out, False, 0, config, act, "gemv")


def decode_linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  act: Optional[str] = None) -> torch.Tensor:
    """act(x [..., K] @ w [N, K].T (+ bias)) for fp16/bf16 weights (act as int8_linear's): on a
    GPU at rows <= GEMV_MAX_M the path DECODE_PATHS["fp_m_le_4"] names (the Triton GEMV, act
    in its epilogue), elsewhere F.linear (cuBLAS) and then the activation kernel."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (x.is_cuda and HAS_TRITON and rows <= GEMV_MAX_M and w.dtype == x.dtype
            and x.dtype != torch.float32 and DECODE_PATHS["fp_m_le_4"] == "triton"):
        return gemv(x, w, bias, act=act)
    return _finish(F.linear(x, w, bias), _check_act(act, w.shape[0], "decode_linear"), None)


# ----------------------------------------------------------------------------- references

def int8_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
    """Dequantize the whole weight to x's dtype (quant_ref), then F.linear."""
    y = F.linear(x, dequantize_ref(q, scale, x.dtype), bias)
    return y if out is None else out.copy_(y)


def linear_ref(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
    return F.linear(x, w, bias)
