"""Every Triton kernel against its torch reference, under the interpreter (TRITON_INTERPRET=1).

Tiny shapes (the interpreter runs programs one by one in numpy). fp32 and fp16 inputs: the
interpreter has no bf16 (numpy lacks it), so bf16 is checked on the GPU (test_triton_gpu.py).
Tolerances, as ||out - ref|| / ||ref||: fp32 1e-5, fp16 1e-2. Every output buffer is poisoned
with NaN before the launch and must come back finite: each element was written.
Inputs are fresh random draws each run; the seed is in every failure message.
"""
import os
import random
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from dsinfer.kernels import (activations, attention, dequantize_ref,  # noqa: E402
                             int8_gemm, kv_write, norms, quantize_ref, rotary)

TOL = {torch.float32: 1e-5, torch.float16: 1e-2}
DTYPES = [torch.float32, torch.float16]


# Triton decides between interpreter and compiler when a function is decorated, its own standard
# library (tl.sum, tl.cdiv ...) included, so TRITON_INTERPRET=1 must be set before triton is
# first imported. In a plain `pytest` run other modules import it first: there these tests skip
# and test_interpreter_suite reruns this file in a fresh interpreter-mode process.
INTERPRET = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on")
# tests that run in any process; every other test here needs the interpreter
ANYWHERE = {"test_interpreter_suite", "test_cpu_without_interpreter_runs_the_references",
            "test_balanced_gemv_rows", "test_pdl_never_on_cpu_or_interpreted",
            "test_import_and_run_without_triton"}


@pytest.fixture(autouse=True)
def _interpreter_only(request):
    if not INTERPRET and request.function.__name__ not in ANYWHERE:
        pytest.skip("needs TRITON_INTERPRET=1 from the start; test_interpreter_suite runs it so")


def test_interpreter_suite():
    if INTERPRET:
        pytest.skip("already in interpreter mode")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          __file__], capture_output=True, text=True, env=env, timeout=900,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]


@pytest.fixture
def gen():
    seed = random.randrange(2 ** 31)
    return torch.Generator().manual_seed(seed), seed


def randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g[0]).to(dtype)


def poison(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def check(out, ref, dtype, seed, what=""):
    assert torch.isfinite(out).all(), f"{what}: unwritten (NaN) or non-finite output, seed {seed}"
    err = ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
    assert err <= TOL[dtype], f"{what}: rel err {err:.2e} > {TOL[dtype]:.0e}, seed {seed}"


# ----------------------------------------------------------------------------- int8 / gemv

# (N, K, groups, group_size): per-row groups; one scale per K-tile (32 | group width);
# per-channel; per-element gather (group width 16 < the interpreter's BLOCK_K 32);
# ragged N and K (masks) with an odd group width
GEOMETRIES = [(32, 64, 1, None), (32, 64, 4, 32), (32, 64, 32, None), (32, 64, 2, 16),
              (24, 48, 3, 24)]
# tiles other than the interpreter's defaults: _linear_kernel (BLOCK_M, BLOCK_N, BLOCK_K,
# SWAP_AB, warps, stages), with the transposed product the GPU tables use, and _gemv_kernel
# (BLOCK_N, BLOCK_K, warps, PREFETCH, REDUCE_K), one K-tile spanning two column groups
# (per-element scales), one longer than K; and _w8_gemv_kernel (BLOCK_N, BLOCK_K, warps,
# PREFETCH), one row of x a program (K-tiles of 8-wide chunks: per-chunk column-group scales)
TILES = [(16, 16, 32, True, 1, 1), (32, 16, 16, False, 1, 1), (8, 64, 1, False, False),
         (8, 64, 1, True, True), (4, 16, 1, True, False), (16, 16, 1, False, True),
         (16, 128, 1, True, True), (8, 64, 1, False), (16, 16, 1, True), (4, 128, 1, False),
         (32, 32, 1, True), (2, 32, 1, False)]


def fenced(t: torch.Tensor) -> torch.Tensor:
    """t as a view inside a NaN frame (NaN columns to the right, a NaN row below): a kernel
    that reads past t's columns or rows gets NaN, so the test fails every time, not only when
    stray memory happens to hold a NaN."""
    frame = torch.full((t.shape[0] + 1, t.shape[1] + 4), float("nan"), dtype=t.dtype)
    frame[:t.shape[0], :t.shape[1]] = t
    return frame[:t.shape[0], :t.shape[1]]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 5, 20])    # GEMV kernel (1, 3), tl.dot tiles (5, 20)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear(geometry, dtype, scale_dtype, m, bias, gen):
    n, k, groups, gs = geometry
    q, s = quantize_ref(randn(gen, n, k), groups, gs, scale_dtype)
    s = fenced(s)
    x = randn(gen, m, k, dtype=dtype)
    b = randn(gen, n, dtype=dtype) if bias else None
    y = int8_gemm.int8_linear(x, q, s, b, out=poison((m, n), dtype))
    check(y, int8_gemm.int8_linear_ref(x.double(), q, s, None if b is None else b.double()),
          dtype, gen[1], f"int8_linear {geometry} {dtype} M={m}")


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2])
def test_int8_linear_tiles(tile, dtype, rows, gen):
    n, k = 48, 64
    q, s = quantize_ref(randn(gen, n, k), 4, 32)
    s = fenced(s)
    x = randn(gen, rows, 3, k, dtype=dtype)              # 3-D activations
    y = int8_gemm.int8_linear(x, q, s, out=poison((rows, 3, n), dtype), config=tile)
    check(y, int8_gemm.int8_linear_ref(x.double(), q, s), dtype, gen[1], f"tile {tile}")


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_prefill_dequant_path(geometry, dtype, bias, monkeypatch, gen):
    """Large M: one dequant pass (_dequant_kernel) then a dense matmul."""
    monkeypatch.setattr(int8_gemm, "PREFILL_DEQUANT_MIN_M", 8)
    n, k, groups, gs = geometry
    q, s = quantize_ref(randn(gen, n, k), groups, gs)
    s = fenced(s)
    w = int8_gemm.dequantize(q, s, dtype)
    check(w, dequantize_ref(q, s, torch.float64), dtype, gen[1], "dequantize")
    x = randn(gen, 9, k, dtype=dtype)
    b = randn(gen, n, dtype=dtype) if bias else None
    y = int8_gemm.int8_linear(x, q, s, b, out=poison((9, n), dtype))
    check(y, int8_gemm.int8_linear_ref(x.double(), q, s, None if b is None else b.double()),
          dtype, gen[1], f"dequant path {geometry}")


def test_int8_linear_strided_weight(gen):
    """A Conv1D stores [K, N]: its transpose is a strided [N, K] view."""
    q, s = quantize_ref(randn(gen, 32, 64), 2, 32)
    s = fenced(s)
    q_view = q.t().contiguous().t()
    x = randn(gen, 3, 64)
    check(int8_gemm.int8_linear(x, q_view, s), int8_gemm.int8_linear_ref(x.double(), q, s),
          torch.float32, gen[1], "strided q")


def test_int8_linear_rejects_bad_geometry():
    q = torch.zeros(32, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="does not tile"):
        int8_gemm.int8_linear(torch.zeros(1, 64), q, torch.ones(3, 1))
    with pytest.raises(ValueError, match="input features"):
        int8_gemm.int8_linear(torch.zeros(1, 60), q, torch.ones(1, 1))
    with pytest.raises(TypeError, match="int8"):
        int8_gemm.int8_linear(torch.zeros(1, 64), q.float(), torch.ones(1, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv(dtype, m, bias, gen):
    n, k = 40, 96
    w, x = randn(gen, n, k, dtype=dtype), randn(gen, m, k, dtype=dtype)
    b = randn(gen, n, dtype=dtype) if bias else None
    y = int8_gemm.gemv(x, w, b, out=poison((m, n), dtype))
    ref = int8_gemm.linear_ref(x.double(), w.double(), None if b is None else b.double())
    check(y, ref, dtype, gen[1], f"gemv {dtype} M={m}")


def epilogue_ref(y: torch.Tensor, act: str) -> torch.Tensor:
    """fp64 maths of the GEMM epilogues: silu(gate) * up of a packed [gate | up] y, or act(y)."""
    if act == "silu_gate":
        gate, up = y.double().chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    return activations.bias_act_ref(y.double(), None, act)


EPILOGUE_ACTS = ["silu_gate", "gelu_tanh", "gelu", "relu"]


@pytest.mark.parametrize("act", EPILOGUE_ACTS)
@pytest.mark.parametrize("m", [1, 3])      # 1: the int8 GEMV's epilogue; 3: tl.dot, then the act
@pytest.mark.parametrize("geometry", [(48, 64, 48, None), (48, 64, 6, 32), (44, 64, 1, None)])
# (2, 32, 1, False): the 2-row int8 programs of _w8_gemv_m1_tile (one gate and one up row
# for silu_gate)
@pytest.mark.parametrize("tile", [None, (8, 64, 1, False), (2, 32, 1, False),
                                  (4, 16, 1, True, False)])
def test_int8_linear_act_epilogue(act, m, geometry, tile, gen):
    """act in the GEMV epilogue equals the GEMM then the activation; "silu_gate" pairs each
    gate row with the up row N / 2 further on (ragged halves: N = 44, 22 outputs)."""
    n, k, groups, gs = geometry
    q, s = quantize_ref(randn(gen, n, k), groups, gs)
    s = fenced(s)
    x, b = randn(gen, m, k), randn(gen, n)
    n_out = n // 2 if act == "silu_gate" else n
    y = int8_gemm.int8_linear(x, q, s, b, out=poison((m, n_out), torch.float32), config=tile,
                              act=act)
    want = epilogue_ref(int8_gemm.int8_linear_ref(x.double(), q, s, b.double()), act)
    check(y, want, torch.float32, gen[1], f"int8 {act} M={m} {geometry} {tile}")


@pytest.mark.parametrize("act", EPILOGUE_ACTS)
@pytest.mark.parametrize("m", [1, 4, 16])   # the GEMV kernel (1, 4); 16: tl.dot, then the act
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_act_epilogue(act, m, dtype, gen):
    n, k = 40, 96
    w, x, b = randn(gen, n, k, dtype=dtype), randn(gen, m, k, dtype=dtype), randn(gen, n, dtype=dtype)
    n_out = n // 2 if act == "silu_gate" else n
    y = int8_gemm.gemv(x, w, b, out=poison((m, n_out), dtype), act=act)
    want = epilogue_ref(int8_gemm.linear_ref(x.double(), w.double(), b.double()), act)
    check(y, want, dtype, gen[1], f"gemv {act} {dtype} M={m}")


@pytest.mark.parametrize("fused", [True, False])
def test_act_epilogue_switch(fused, monkeypatch, gen):
    """DECODE_PATHS["act_epilogue"] off: the GEMV, then the activation kernel; same values."""
    monkeypatch.setitem(int8_gemm.DECODE_PATHS, "act_epilogue", fused)
    q, s = quantize_ref(randn(gen, 48, 64), 48)
    x, b = randn(gen, 1, 64), randn(gen, 48)
    y = int8_gemm.int8_linear(x, q, s, b, out=poison((1, 24), torch.float32), act="silu_gate")
    want = epilogue_ref(int8_gemm.int8_linear_ref(x.double(), q, s, b.double()), "silu_gate")
    check(y, want, torch.float32, gen[1], f"act_epilogue={fused}")


def test_act_epilogue_rejects():
    q = torch.zeros(6, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="even N"):
        int8_gemm.int8_linear(torch.zeros(1, 8), q[:5], torch.ones(1, 1), act="silu_gate")
    with pytest.raises(ValueError, match="unknown act"):
        int8_gemm.int8_linear(torch.zeros(1, 8), q, torch.ones(1, 1), act="swish")


# ----------------------------------------------------------------------------- norms

@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [None, "same", "fp32"])
@pytest.mark.parametrize("affine", ["weight", "weight+bias", "none"])
@pytest.mark.parametrize("hidden", [40, 64])
def test_add_norm(norm, dtype, residual, affine, hidden, gen):
    if norm == "rmsnorm" and affine == "weight+bias":
        pytest.skip("RMSNorm has no bias")
    shape = (2, 3, hidden)
    x = randn(gen, *shape, dtype=dtype)
    r = None if residual is None else randn(
        gen, *shape, dtype=dtype if residual == "same" else torch.float32)
    w = randn(gen, hidden, dtype=dtype) if affine != "none" else None
    b = randn(gen, hidden, dtype=dtype) if affine == "weight+bias" else None
    h_out = None if r is None else poison(shape, r.dtype)
    y, h = norms.add_norm(x, r, w, b, 1e-5, norm, out=poison(shape, dtype), residual_out=h_out)
    y_ref, h_ref = norms.add_norm_ref(x, r, w, b, 1e-5, norm)
    check(y, y_ref, dtype, gen[1], f"{norm} out")
    assert h.dtype == h_ref.dtype
    check(h, h_ref, dtype, gen[1], f"{norm} residual")
    if r is None:
        assert h is x


@pytest.mark.parametrize("early", [True, False])
@pytest.mark.parametrize("norm, affine", [("layernorm", "weight+bias"), ("rmsnorm", "weight"),
                                          ("layernorm", "none")])
def test_add_norm_early_loads(norm, affine, early, gen, monkeypatch):
    """Weight, bias and (residual_ready) the residual read before the PDL wait, or all after:
    the same values, every output written."""
    monkeypatch.setitem(norms.PDL, "early", early)
    shape, hidden = (3, 40), 40
    x, r = randn(gen, *shape, dtype=torch.float16), randn(gen, *shape, dtype=torch.float16)
    w = randn(gen, hidden, dtype=torch.float16) if affine != "none" else None
    b = randn(gen, hidden, dtype=torch.float16) if affine == "weight+bias" else None
    y, h = norms.add_norm(x, r, w, b, 1e-5, norm, out=poison(shape, torch.float16),
                          residual_out=poison(shape, torch.float16), residual_ready=True)
    y_ref, h_ref = norms.add_norm_ref(x, r, w, b, 1e-5, norm)
    check(y, y_ref, torch.float16, gen[1], f"{norm} out")
    check(h, h_ref, torch.float16, gen[1], f"{norm} residual")


def test_add_norm_rejects():
    with pytest.raises(ValueError, match="unknown norm"):
        norms.add_norm(torch.zeros(2, 4), None, None, norm="batchnorm")
    with pytest.raises(ValueError, match="weight"):
        norms.add_norm(torch.zeros(2, 4), None, torch.ones(5))


# ----------------------------------------------------------------------------- activations

@pytest.mark.parametrize("act", activations.ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_bias_act(act, dtype, bias, gen):
    wide = randn(gen, 2, 3, 80, dtype=dtype) * 3
    x = wide[..., :72]                                   # rows strided: a slice of a wider tensor
    b = randn(gen, 72, dtype=dtype) if bias else None
    y = activations.bias_act(x, b, act, out=poison(x.shape, dtype))
    check(y, activations.bias_act_ref(x.double(), None if b is None else b.double(), act),
          dtype, gen[1], f"bias_act {act}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [False, True])
def test_silu_mul(dtype, packed, gen):
    a, b = randn(gen, 5, 48, dtype=dtype) * 3, randn(gen, 5, 48, dtype=dtype)
    y = (activations.silu_mul(torch.cat([a, b], -1), out=poison(a.shape, dtype)) if packed
         else activations.silu_mul(a, b, out=poison(a.shape, dtype)))
    check(y, activations.silu_mul_ref(a.double(), b.double()), dtype, gen[1], "silu_mul")


def test_gelu_matches_torch_gelu():
    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(activations.bias_act(x[None], act="gelu_tanh")[0],
                               torch.nn.functional.gelu(x, approximate="tanh"))
    torch.testing.assert_close(activations.bias_act(x[None], act="gelu")[0],
                               torch.nn.functional.gelu(x))


# ----------------------------------------------------------------------------- rotary

@pytest.mark.parametrize("style", rotary.STYLES)
@pytest.mark.parametrize("rotary_dim", [None, 16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["bshd", "bhsd", "thd"])
@pytest.mark.parametrize("inplace", [False, True])
def test_rotary(style, rotary_dim, dtype, layout, inplace, gen):
    B, S, H, D = 2, 3, 5, 24
    cos, sin = rotary.rotary_cache(64, rotary_dim or D)
    if layout == "bhsd":                                 # HF [B, H, S, D], passed as a view
        x = randn(gen, B, H, S, D, dtype=dtype).transpose(1, 2)
    elif layout == "thd":
        x = randn(gen, S, H, D, dtype=dtype)
    else:
        x = randn(gen, B, S, H, D, dtype=dtype)
    pos = torch.randint(0, 64, x.shape[:-2], generator=gen[0])
    ref = rotary.apply_rotary_ref(x.double(), cos.double(), sin.double(), pos, style, rotary_dim)
    x_in = x.clone()
    if not inplace:
        x_in.copy_(torch.full_like(x, float("nan")))     # the kernel must not read its output
        x_in = x
    y = rotary.apply_rotary(x_in, cos, sin, pos, style, rotary_dim, inplace=inplace)
    assert y.stride() == x.stride()
    if inplace:
        assert y.data_ptr() == x_in.data_ptr()
    check(y, ref, dtype, gen[1], f"rotary {style} {rotary_dim} {layout}")


# (layout, heads, kv heads): GQA packed [q | k | v], MHA packed, per-head interleaved [q k v]
QKV_LAYOUTS = [("packed", 4, 2), ("packed", 3, 3), ("per_head", 3, 3)]


@pytest.mark.parametrize("layout,heads,kv_heads", QKV_LAYOUTS)
@pytest.mark.parametrize("rope", [None, ("neox", 24), ("neox", 8), ("gptj", 12)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", [1, 3, 9])        # 9: 18 tokens, programs of 16 (one partial)
@pytest.mark.parametrize("early", [True, False])  # positions, slot, cos / sin before PDL's wait
def test_qkv_to_cache(layout, heads, kv_heads, rope, dtype, S, early, gen, monkeypatch):
    monkeypatch.setitem(kv_write.PDL, "early", early)
    B, D, max_len, start = 2, 24, 16, 5
    qkv = randn(gen, B, S, (heads + 2 * kv_heads) * D, dtype=dtype)
    k_cache = randn(gen, B, kv_heads, max_len, D, dtype=dtype)   # other slots must stay
    v_cache = randn(gen, B, kv_heads, max_len, D, dtype=dtype)
    pos = torch.randint(0, 40, (B, S), generator=gen[0])
    cos, sin = rotary.rotary_cache(64, rope[1]) if rope else (None, None)
    style, rdim = rope if rope else ("neox", 0)
    slot = torch.tensor([start], dtype=torch.int32)
    want = [t.clone().double() for t in (qkv, k_cache, v_cache)]
    kv_write.qkv_to_cache_ref(*want, slot, pos, heads, kv_heads, D, layout,
                              None if cos is None else cos.double(),
                              None if sin is None else sin.double(), style, rdim)
    kv_write.qkv_to_cache(qkv, k_cache, v_cache, slot, pos, heads, kv_heads, D, layout, cos,
                          sin, style, rdim)
    for got, ref, name in zip((qkv, k_cache, v_cache), want, ("qkv", "k_cache", "v_cache")):
        check(got, ref, dtype, gen[1], f"qkv_to_cache {layout} {rope} {name}")


def test_qkv_to_cache_rejects_bad_shapes():
    qkv = torch.zeros(1, 1, 5 * 8)
    cache = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="qkv must be"):
        kv_write.qkv_to_cache(qkv, cache, cache, torch.zeros(1, dtype=torch.int32),
                              torch.zeros(1, 1, dtype=torch.long), 2, 2, 8)


def test_rotary_cache_matches_hf_angles():
    cos, sin = rotary.rotary_cache(8, 4, base=100.0)
    inv = 1.0 / 100.0 ** (torch.arange(0, 4, 2).float() / 4)
    ang = torch.arange(8).float()[:, None] * inv
    torch.testing.assert_close(cos, ang.cos())
    torch.testing.assert_close(sin, ang.sin())


# ----------------------------------------------------------------------------- attention

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("sq", [1, 3])
@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_attention(dtype, group, sq, alibi, window, splits, gen):
    B, Hkv, max_len, D = 2, 2, 40, 24
    k_cache = randn(gen, B, Hkv, max_len, D, dtype=dtype)
    v_cache = randn(gen, B, Hkv, max_len, D, dtype=dtype)
    q = randn(gen, B, Hkv * group, sq, D, dtype=dtype)
    lengths = torch.tensor([random.randint(sq, 12), random.randint(24, max_len)], dtype=torch.int32)
    slopes = torch.rand(Hkv * group, generator=gen[0]) if alibi else None
    y = attention.decode_attention(q, k_cache, v_cache, lengths, None, slopes, window, splits,
                                   out=poison(q.shape, dtype))
    ref = attention.decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), lengths,
                                         None, slopes, window)
    check(y, ref, dtype, gen[1], f"decode G={group} SQ={sq} alibi={alibi} window={window}")


@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("sq", [1, 2])
def test_decode_attention_left_padding(alibi, window, splits, sq, gen):
    """first_key masks a left-padded prefix: the kernel equals the reference, and the
    reference equals attention over each row's unpadded keys alone (ALiBi and windows act on
    relative distances, so the shift by the padding changes nothing)."""
    B, Hq, Hkv, max_len, D = 3, 4, 2, 40, 16
    k_cache, v_cache = randn(gen, B, Hkv, max_len, D), randn(gen, B, Hkv, max_len, D)
    q = randn(gen, B, Hq, sq, D)
    lengths = torch.tensor([9, 33, 20], dtype=torch.int32)
    first = torch.tensor([0, 17, 19 - (sq - 1)], dtype=torch.int32)  # last row: sq keys left
    slopes = torch.rand(Hq, generator=gen[0]) if alibi else None
    y = attention.decode_attention(q, k_cache, v_cache, lengths, None, slopes, window, splits,
                                   out=poison(q.shape, torch.float32), first_key=first)
    ref = attention.decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), lengths,
                                         None, slopes, window, first)
    check(y, ref, torch.float32, gen[1], f"left-padded decode alibi={alibi} window={window}")
    for b in range(B):
        f, n = int(first[b]), int(lengths[b])
        alone = attention.attention_ref(q[b].double(), k_cache[b, :, f:n].double(),
                                        v_cache[b, :, f:n].double(),
                                        torch.arange(n - f - sq, n - f), 1 / D ** 0.5, slopes,
                                        window)
        torch.testing.assert_close(ref[b], alone, rtol=1e-5, atol=1e-6)   # both fp32 inside


def test_decode_attention_strided_and_unscaled(gen):
    """q and out as [B, S, H, D] buffers viewed [B, H, S, D]; GPT-Neo's scale 1.0."""
    B, H, S, D = 2, 4, 2, 16
    k_cache, v_cache = randn(gen, B, 2, 20, D), randn(gen, B, 2, 20, D)
    q = randn(gen, B, S, H, D).transpose(1, 2)
    out = poison((B, S, H, D), torch.float32).transpose(1, 2)
    lengths = torch.tensor([3, 20], dtype=torch.int32)
    y = attention.decode_attention(q, k_cache, v_cache, lengths, scale=1.0, out=out)
    assert y.data_ptr() == out.data_ptr()
    check(y, attention.decode_attention_ref(q, k_cache, v_cache, lengths, 1.0), torch.float32,
          gen[1], "strided decode")


@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("past", [0, 3])
def test_prefill_attention_sdpa(alibi, window, past, gen):
    B, Hq, Hkv, S, D = 2, 4, 2, 9, 16
    q = randn(gen, B, Hq, S, D)
    k, v = randn(gen, B, Hkv, S + past, D), randn(gen, B, Hkv, S + past, D)
    slopes = torch.rand(Hq, generator=gen[0]) if alibi else None
    y = attention.prefill_attention(q, k, v, None, slopes, window)
    check(y, attention.prefill_attention_ref(q.double(), k.double(), v.double(), None, slopes,
                                             window), torch.float32, gen[1], "prefill")


def test_prefill_then_decode_agree(gen):
    """The decode kernel at the last position equals prefill's last row (same maths)."""
    B, H, S, D = 1, 2, 11, 16
    q, k, v = randn(gen, B, H, S, D), randn(gen, B, H, S, D), randn(gen, B, H, S, D)
    slopes = torch.tensor([0.5, 0.25])
    full = attention.prefill_attention(q, k, v, None, slopes, 4)
    k_cache, v_cache = torch.zeros(B, H, 16, D), torch.zeros(B, H, 16, D)
    attention.write_kv(k_cache, v_cache, k, v, torch.zeros(B, dtype=torch.int32))
    last = attention.decode_attention(q[:, :, -1:], k_cache, v_cache,
                                      torch.tensor([S], dtype=torch.int32), None, slopes, 4)
    check(last, full[:, :, -1:], torch.float32, gen[1], "prefill vs decode")


def test_write_kv(gen):
    k_cache, v_cache = torch.zeros(2, 2, 10, 4), torch.zeros(2, 2, 10, 4)
    k, v = randn(gen, 2, 2, 3, 4), randn(gen, 2, 2, 3, 4)
    attention.write_kv(k_cache, v_cache, k, v, torch.tensor([0, 6]))
    assert torch.equal(k_cache[0, :, :3], k[0]) and torch.equal(v_cache[1, :, 6:9], v[1])
    assert k_cache[0, :, 3:].abs().sum() == 0 and k_cache[1, :, :6].abs().sum() == 0


# ----------------------------------------------------------------------------- fallbacks

def test_cpu_without_interpreter_runs_the_references(monkeypatch, gen):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, s = quantize_ref(randn(gen, 8, 16), 2)
    x = randn(gen, 3, 16)
    assert torch.equal(int8_gemm.int8_linear(x, q, s), int8_gemm.int8_linear_ref(x, q, s))
    y, h = norms.add_norm(x, x, torch.ones(16), norm="rmsnorm")
    y_ref, h_ref = norms.add_norm_ref(x, x, torch.ones(16), norm="rmsnorm")
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)


NO_TRITON = """
import sys
sys.modules["triton"] = None          # import triton -> ImportError, as on macOS / Windows
import torch
import dsinfer.kernels as K
from dsinfer.kernels import int8_gemm
assert not int8_gemm.HAS_TRITON
q, s = K.quantize_ref(torch.randn(8, 16), 2)
x = torch.randn(2, 16)
assert torch.equal(K.int8_linear(x, q, s), K.int8_linear_ref(x, q, s))
K.gemv(x, torch.randn(8, 16)); K.add_norm(x, x, torch.ones(16)); K.bias_act(x); K.silu_mul(x)
c, sn = K.rotary_cache(4, 16)
K.apply_rotary(torch.randn(1, 2, 1, 16), c, sn, torch.zeros(1, 2, dtype=torch.long))
K.decode_attention(torch.randn(1, 2, 1, 16), torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16),
                   torch.tensor([3]))
print("ok")
"""


def test_import_and_run_without_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", NO_TRITON], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_balanced_gemv_rows():
    """GEMV tiles whose programs spread evenly over 132 SMs (H100/H200): 8-row tiles put 2.4
    programs on an average SM at N = 2560 and 3 on the busiest, so only 2- and 4-row ones
    qualify; every tile height divides N = 4096 evenly enough."""
    rows = int8_gemm._balanced_rows(2560, 132)
    assert 4 in rows and 8 not in rows, rows
    assert {8, 16, 32} <= set(int8_gemm._balanced_rows(4096, 132))


@pytest.mark.parametrize("n,k", [(6, 2560), (10, 2048), (5, 5504), (12, 4096), (3, 11008)])
def test_m1_rule_tiles(n, k, gen):
    """The tiles the M = 1 rules pick on a GPU (_gemv_m1_tile, _w8_gemv_m1_tile: K-tiles of
    512 to 2048 that divide K or leave a masked tail) run right in the interpreter, fp32 and
    int8 per-channel, poisoned outputs."""
    x, w = randn(gen, 1, k), randn(gen, n, k) * 0.02
    y = int8_gemm.gemv(x, w, out=poison((1, n), torch.float32),
                       config=int8_gemm._gemv_m1_tile(n, k))
    check(y, int8_gemm.linear_ref(x.double(), w.double()), torch.float32, gen[1], "gemv")
    q, s = quantize_ref(w, n)
    y = int8_gemm.int8_linear(x, q, s, out=poison((1, n), torch.float32),
                              config=int8_gemm._w8_gemv_m1_tile(n, k))
    ref = int8_gemm.int8_linear_ref(x.double(), q, s.double())
    check(y, ref, torch.float32, gen[1], "int8")


@pytest.mark.parametrize("n,k", [(4096, 11008), (22016, 4096), (5120, 13824), (28672, 8192),
                                 (2560, 10240), (2560, 2560), (6, 5)])
def test_w8_rule_gated_tiles_are_even(n, k):
    """A packed [gate | up] weight pairs the rows of each program (_weight_rows), so the int8
    rule never gives it a one-row tile, even where plain weights of its shape get one (long
    rows into many outputs: Llama's down projection; a 70B model's packed gate|up)."""
    for gated in (False, True):
        bn, bk, warps, _ = int8_gemm._w8_gemv_m1_tile(n, k, gated)
        assert bn >= 1 and bk in (512, 1024, 2048) and warps in (2, 4, 8)
        assert not gated or bn % 2 == 0, (n, k, bn)
    assert int8_gemm._w8_gemv_m1_tile(4096, 11008)[0] == 1     # plain: one row


@pytest.mark.parametrize("act", ["identity", "gelu"])
def test_w8_one_row_tile(act, gen):
    """The rule's one-row programs over 2 warps (long rows: Llama's 4096x11008), at a small
    shape in the interpreter: ragged K tail, row-group scales and an epilogue activation."""
    n, k = 7, 1100
    for groups in (n, 1):
        q, s = quantize_ref(randn(gen, n, k), groups)
        x, b = randn(gen, 1, k), randn(gen, n)
        y = int8_gemm.int8_linear(x, q, s, b, out=poison((1, n), torch.float32),
                                  config=(1, 1024, 2, False), act=act)
        want = epilogue_ref(int8_gemm.int8_linear_ref(x.double(), q, s, b.double()), act)
        check(y, want, torch.float32, gen[1], f"int8 one-row {act} groups={groups}")


def test_pdl_never_on_cpu_or_interpreted(monkeypatch):
    """Programmatic dependent launch is a GPU launch option: with it switched on, kernels on a
    CPU tensor (the interpreter, or the references) get PDL=False and no launch option."""
    from dsinfer.kernels import _triton as T
    monkeypatch.setitem(T.PDL, "on", True)
    assert T.pdl_args(torch.zeros(2)) == {"PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert T.pdl_launch(torch.zeros(2)) == {}

