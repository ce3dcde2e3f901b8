"""The Triton kernels on a GPU at real shapes (Llama-7B / GPT-Neo / BLOOM layers), fp16 and bf16.

Correctness against the torch references (||out - ref|| / ||ref|| <= 1e-2 for 16-bit inputs; the
reference runs in fp32 on the same inputs), outputs poisoned with NaN before every launch.
test_timings prints kernel times next to torch's (cuBLAS fp16, reference dequant + matmul, eager
ops): small kernels replayed from a CUDA graph over buffers rotated past L2 (a graph-captured
decode step), large ones with triton.testing.do_bench (median, L2 flushed). The numbers are
printouts, not assertions. DSINFER_SWEEP=1 also times GEMV tiles one by one.
Run: pytest -m gpu -s tests/kernels/test_triton_gpu.py (OUT=dir also writes kernels_bench.txt).
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from dsinfer.kernels import (activations, attention, int8_gemm, kv_write, norms,
                             quantize_ref, rotary)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = "cuda"
TOL = 1e-2
LLAMA = [(4096, 4096), (11008, 4096), (4096, 11008)]       # (N, K): q/o proj, gate/up, down


def rel(out, ref):
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite output"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def poison(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def quantized(n, k, groups, group_size, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = torch.randn(n, k, device=DEV, generator=g) * 0.02
    return quantize_ref(w, groups, group_size)


# ----------------------------------------------------------------------------- correctness

@pytest.mark.parametrize("nk", LLAMA + [(2048, 4096), (7680, 2560)])
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 256, 2048])   # M=1 picker, tl.dot tiles, dequant
@pytest.mark.parametrize("geometry", [(64, None), (1, 128), ("pc", None), ("pc", 128)])
def test_int8_linear(nk, m, geometry):
    n, k = nk
    groups, gs = geometry
    q, s = quantized(n, k, n if groups == "pc" else groups, gs)    # "pc": per output channel
    x = torch.randn(m, k, device=DEV, dtype=torch.float16)
    b = torch.randn(n, device=DEV, dtype=torch.float16) if m == 16 else None
    y = int8_gemm.int8_linear(x, q, s, b, out=poison((m, n), torch.float16))
    ref = int8_gemm.int8_linear_ref(x.float(), q, s, None if b is None else b.float())
    assert rel(y, ref) < TOL


@pytest.mark.parametrize("nk", [(4096, 4096), (4096, 5504)])    # 5504: ragged last K-tile
@pytest.mark.parametrize("geometry", [(64, None), ("pc", 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["gemv", "dot"])
@pytest.mark.parametrize("fast_cvt", [True, False])
def test_int8_linear_m1_paths(nk, geometry, dtype, path, fast_cvt, monkeypatch):
    """Both M = 1 kernels, whichever the picker would choose, with both int8 conversions
    (PRMT byte permutes, the default, and I2F: DSINFER_INT8_FAST_CVT=0), bias."""
    monkeypatch.setattr(int8_gemm, "FAST_CVT", fast_cvt)
    n, k = nk
    groups, gs = geometry
    q, s = quantized(n, k, n if groups == "pc" else groups, gs)
    x = torch.randn(1, k, device=DEV, dtype=dtype)
    b = torch.randn(n, device=DEV, dtype=dtype)
    monkeypatch.setitem(int8_gemm.DECODE_PATHS, "int8_m1", path)
    y = int8_gemm.int8_linear(x, q, s, b, out=poison((1, n), dtype))
    assert rel(y, int8_gemm.int8_linear_ref(x.float(), q, s, b.float())) < TOL


@pytest.mark.parametrize("m", [1, 2048])
def test_int8_linear_bf16_fp16_scales(m):
    q, s = quantized(4096, 4096, 1, 128)
    s = s.half()
    x = torch.randn(m, 4096, device=DEV, dtype=torch.bfloat16)
    y = int8_gemm.int8_linear(x, q, s, out=poison((m, 4096), torch.bfloat16))
    assert rel(y, int8_gemm.int8_linear_ref(x.float(), q, s)) < TOL


@pytest.mark.parametrize("nk", LLAMA + [(2560, 10240), (7680, 2560), (2560, 2560)])
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv(nk, m, dtype):
    """M = 1 through _gemv_m1_tile's tiles (2-, 4- and 8-row programs, masked K tails)."""
    n, k = nk
    w = torch.randn(n, k, device=DEV, dtype=dtype) * 0.02
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    y = int8_gemm.gemv(x, w, out=poison((m, n), dtype))
    assert rel(y, F.linear(x.float(), w.float())) < TOL


@pytest.mark.parametrize("nk,act", [((22016, 4096), "silu_gate"), ((10240, 2560), "gelu_tanh"),
                                    ((16384, 4096), "gelu"),     # Llama, GPT-Neo, NeoX MLPs
                                    ((8192, 8192), "silu_gate")])  # long gated rows: 2-row tile
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("m", [1, 4])
def test_act_epilogue(nk, act, int8, m):
    """The decode GEMVs with the MLP activation in their epilogue (int8 at M = 4: tl.dot, then
    the activation kernel) against F.linear and torch's activation."""
    n, k = nk
    w = torch.randn(n, k, device=DEV) * 0.02
    x = torch.randn(m, k, device=DEV, dtype=torch.float16)
    b = torch.randn(n, device=DEV, dtype=torch.float16)
    n_out = n // 2 if act == "silu_gate" else n
    if int8:
        q, s = quantize_ref(w, n)
        y = int8_gemm.int8_linear(x, q, s, b, out=poison((m, n_out), torch.float16), act=act)
        ref = int8_gemm.int8_linear_ref(x.float(), q, s, b.float())
    else:
        y = int8_gemm.gemv(x, w.half(), b, out=poison((m, n_out), torch.float16), act=act)
        ref = F.linear(x.float(), w.half().float(), b.float())
    if act == "silu_gate":
        gate, up = ref.chunk(2, dim=-1)
        ref = F.silu(gate) * up
    else:
        ref = F.gelu(ref, approximate="tanh" if act == "gelu_tanh" else "none")
    assert rel(y, ref) < TOL


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [2560, 4096, 5120])
def test_add_norm(norm, dtype, hidden):
    x = torch.randn(2048, hidden, device=DEV, dtype=dtype)
    r = torch.randn(2048, hidden, device=DEV, dtype=dtype)
    w = torch.randn(hidden, device=DEV, dtype=dtype)
    b = torch.randn(hidden, device=DEV, dtype=dtype) if norm == "layernorm" else None
    y, h = norms.add_norm(x, r, w, b, 1e-5, norm, out=poison(x.shape, dtype),
                          residual_out=poison(x.shape, dtype))
    y_ref, h_ref = norms.add_norm_ref(x, r, w, b, 1e-5, norm)
    assert rel(y, y_ref) < TOL and rel(h, h_ref) < TOL


@pytest.mark.parametrize("act", activations.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_act(act, dtype):
    x = torch.randn(512, 10240, device=DEV, dtype=dtype) * 3
    b = torch.randn(10240, device=DEV, dtype=dtype)
    y = activations.bias_act(x, b, act, out=poison(x.shape, dtype))
    assert rel(y, activations.bias_act_ref(x, b, act)) < TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_silu_mul(dtype):
    x = torch.randn(512, 2 * 11008, device=DEV, dtype=dtype) * 3
    y = activations.silu_mul(x, out=poison((512, 11008), dtype))
    assert rel(y, activations.silu_mul_ref(x)) < TOL


@pytest.mark.parametrize("style,heads,head_dim,rotary_dim", [
    ("neox", 32, 128, None),         # Llama-7B
    ("gptj", 16, 256, 64),           # GPT-J-6B
    ("neox", 32, 80, 20),            # GPT-NeoX / Pythia-2.8B (rotary_pct 0.25)
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rotary(style, heads, head_dim, rotary_dim, dtype):
    B, S = 4, 512
    cos, sin = rotary.rotary_cache(4096, rotary_dim or head_dim, device=DEV)
    x = torch.randn(B, heads, S, head_dim, device=DEV, dtype=dtype).transpose(1, 2)
    pos = torch.randint(0, 4096, (B, S), device=DEV)
    y = rotary.apply_rotary(x, cos, sin, pos, style, rotary_dim)
    assert rel(y, rotary.apply_rotary_ref(x, cos, sin, pos, style, rotary_dim)) < TOL


@pytest.mark.parametrize("heads,kv_heads,head_dim,rope", [
    (32, 32, 128, ("neox", 128)),    # Llama-7B
    (32, 8, 128, ("neox", 128)),     # GQA 4:1
    (16, 16, 256, ("gptj", 64)),     # GPT-J
    (20, 20, 128, None),             # GPT-Neo (no rotary)
])
@pytest.mark.parametrize("B,S", [(4, 1), (1, 512), (3, 77)])
def test_qkv_to_cache(heads, kv_heads, head_dim, rope, B, S):
    """Decode steps (a program per token) and prompts (16 tokens a program, a partial last
    one): q rotated in place, k and v in their slots, every other cache slot untouched."""
    dtype, max_len, start = torch.float16, 1024, 5
    qkv = torch.randn(B, S, (heads + 2 * kv_heads) * head_dim, device=DEV, dtype=dtype)
    caches = [torch.randn(B, kv_heads, max_len, head_dim, device=DEV, dtype=dtype)
              for _ in range(2)]
    pos = torch.randint(0, 4096, (B, S), device=DEV)
    cos, sin = rotary.rotary_cache(4096, rope[1], device=DEV) if rope else (None, None)
    style, rdim = rope if rope else ("neox", 0)
    slot = torch.tensor([start], dtype=torch.int32, device=DEV)
    want = [t.float() for t in (qkv, *caches)]
    kv_write.qkv_to_cache_ref(*want, slot, pos, heads, kv_heads, head_dim, "packed", cos, sin,
                              style, rdim)
    kv_write.qkv_to_cache(qkv, *caches, slot, pos, heads, kv_heads, head_dim, "packed", cos,
                          sin, style, rdim)
    for got, ref in zip((qkv, *caches), want):
        assert rel(got, ref) < TOL
    keep = torch.ones(max_len, dtype=torch.bool, device=DEV)
    keep[start:start + S] = False
    for got, ref in zip(caches, want[1:]):          # the other slots: bit for bit
        assert torch.equal(got[:, :, keep], ref[:, :, keep].to(dtype))


@pytest.mark.parametrize("hq,hkv,head_dim,alibi,window", [
    (32, 32, 128, False, 0),         # Llama-7B
    (32, 8, 128, False, 0),          # GQA 4:1
    (32, 32, 128, True, 0),          # BLOOM-style ALiBi
    (20, 20, 128, False, 256),       # GPT-Neo-2.7B local layer
    (16, 16, 256, False, 0),         # GPT-J head_dim 256
])
@pytest.mark.parametrize("sq", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
def test_decode_attention(hq, hkv, head_dim, alibi, window, sq, dtype, padded):
    B, max_len = 4, 2048
    k_cache = torch.randn(B, hkv, max_len, head_dim, device=DEV, dtype=dtype)
    v_cache = torch.randn(B, hkv, max_len, head_dim, device=DEV, dtype=dtype)
    q = torch.randn(B, hq, sq, head_dim, device=DEV, dtype=dtype)
    lengths = torch.tensor([7, 300, 1500, 2048], device=DEV, dtype=torch.int32)
    slopes = torch.rand(hq, device=DEV) if alibi else None
    first = torch.tensor([3, 100, 1400, 0], device=DEV, dtype=torch.int32) if padded else None
    y = attention.decode_attention(q, k_cache, v_cache, lengths, None, slopes, window,
                                   out=poison(q.shape, dtype), first_key=first)
    ref = attention.decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), lengths,
                                         None, slopes, window, first)
    assert rel(y, ref) < TOL


@pytest.mark.parametrize("hq,hkv", [(32, 32), (32, 8)])
def test_decode_attention_splits_in_graph(hq, hkv):
    """Batch-1 decode (8 splits of a 2048-key cache, most past the keys, then the combine
    kernel) in a CUDA graph replayed with growing lengths, each replay against the
    reference."""
    D, max_len = 128, 2048
    k_cache = torch.randn(1, hkv, max_len, D, device=DEV, dtype=torch.float16)
    v_cache = torch.randn(1, hkv, max_len, D, device=DEV, dtype=torch.float16)
    q = torch.randn(1, hq, 1, D, device=DEV, dtype=torch.float16)
    lengths = torch.tensor([33], device=DEV, dtype=torch.int32)
    out = poison(q.shape, torch.float16)
    attention.decode_attention(q, k_cache, v_cache, lengths, out=out)       # compile, eager
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attention.decode_attention(q, k_cache, v_cache, lengths, out=out)
    for n in (33, 34, 300, 1999, 2048):
        lengths.fill_(n)
        out.fill_(float("nan"))
        graph.replay()
        ref = attention.decode_attention_ref(q.float(), k_cache.float(), v_cache.float(),
                                             lengths)
        assert rel(out, ref) < TOL, n


@pytest.mark.parametrize("alibi,window", [(False, 0), (True, 0), (False, 256)])
def test_prefill_attention(alibi, window):
    B, H, S, D = 2, 16, 1024, 128
    q, k, v = (torch.randn(B, H, S, D, device=DEV, dtype=torch.float16) for _ in range(3))
    slopes = torch.rand(H, device=DEV) if alibi else None
    y = attention.prefill_attention(q, k, v, None, slopes, window)
    ref = attention.prefill_attention_ref(q.float(), k.float(), v.float(), None, slopes, window)
    assert rel(y, ref) < TOL


# ----------------------------------------------------------------------------- timings

def _bench(fn):
    """Median ms of fn through triton's do_bench (L2 flushed before each run). For kernels of a
    few microseconds this includes the CPU launch time: use _graph_us for those."""
    import triton
    fn()                       # compile / autotune outside the timing
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _graph_us(fns, reps=20):
    """Median microseconds per call of fns (closures, each on its own buffers, together larger
    than L2), replayed from one CUDA graph: GPU time without CPU launch overhead, as in a
    graph-captured decode step."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:          # compile, autotune, warm the allocator outside the capture
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for f in fns:
                f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / (reps * len(fns)))
    return sorted(times)[len(times) // 2]


class Report:
    def __init__(self):
        self.lines = [f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}"]

    def __call__(self, line=""):
        print(line, flush=True)
        self.lines.append(line)

    def save(self):
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "kernels_bench.txt"), "a") as f:
                f.write("\n".join(self.lines) + "\n")


def _copy_bandwidth():
    a = torch.empty(2 ** 28, device=DEV)          # 1 GiB
    b = torch.empty_like(a)
    t = _bench(lambda: b.copy_(a))
    return 2 * a.numel() * 4 / t / 1e6           # GB/s, bytes read + written


def _copies(nbytes, total=192 * 2 ** 20):
    return max(2, math.ceil(total / nbytes))


def _decode_table(rep):
    rep("W8A16 decode, CUDA-graph replay, weights rotated past L2: us (GB/s of weight bytes)")
    rep(f"{'N':>6} {'K':>6} {'M':>3} | {'cuBLAS fp16':>14} {'ref deq+mm':>10} {'int8 g64':>14} "
        f"{'int8 k128':>14} {'fp16 gemv':>14} | int8/cuBLAS")
    for n, k in LLAMA:
        w16 = [torch.randn(n, k, device=DEV, dtype=torch.float16) * 0.02
               for _ in range(_copies(2 * n * k))]
        q64 = [quantize_ref(torch.randn(n, k, device=DEV) * 0.02, 64)
               for _ in range(_copies(n * k))]
        qk = [quantize_ref(torch.randn(n, k, device=DEV) * 0.02, 1, 128)
              for _ in range(_copies(n * k))]
        for m in [1, 8, 16]:
            x = torch.randn(m, k, device=DEV, dtype=torch.float16)
            t_cub = _graph_us([lambda w=w: F.linear(x, w) for w in w16])
            t_ref = _graph_us([lambda q=q, s=s: int8_gemm.int8_linear_ref(x, q, s)
                               for q, s in q64[:2]], reps=4)
            t_g = _graph_us([lambda q=q, s=s: int8_gemm.int8_linear(x, q, s) for q, s in q64])
            t_k = _graph_us([lambda q=q, s=s: int8_gemm.int8_linear(x, q, s) for q, s in qk])
            t_v = _graph_us([lambda w=w: int8_gemm.gemv(x, w) for w in w16])
            i8, f16 = n * k / 1e3, 2 * n * k / 1e3     # bytes / 1e3: GB/s = that / us
            rep(f"{n:>6} {k:>6} {m:>3} | {t_cub:6.1f} ({f16 / t_cub:5.0f}) {t_ref:10.1f} "
                f"{t_g:6.1f} ({i8 / t_g:5.0f}) {t_k:6.1f} ({i8 / t_k:5.0f}) "
                f"{t_v:6.1f} ({f16 / t_v:5.0f}) | {t_cub / t_g:5.2f}x")
        del w16, q64, qk


def _prefill_table(rep):
    rep("W8A16 prefill, do_bench median: us (TFLOP/s); int8 = default path (fused kernel below "
        f"M={int8_gemm.PREFILL_DEQUANT_MIN_M}, dequant + cuBLAS from it)")
    rep(f"{'N':>6} {'K':>6} {'M':>5} | {'cuBLAS fp16':>14} {'ref deq+mm':>10} {'int8':>14} "
        f"{'int8 fused':>10} {'deq+cuBLAS':>10} | int8/cuBLAS")
    for n, k in LLAMA:
        w16 = torch.randn(n, k, device=DEV, dtype=torch.float16) * 0.02
        q, s = quantize_ref(w16.float(), 64)
        for m in [256, 1024, 4096]:
            x = torch.randn(m, k, device=DEV, dtype=torch.float16)
            t_cub = _bench(lambda: F.linear(x, w16)) * 1e3
            t_ref = _bench(lambda: int8_gemm.int8_linear_ref(x, q, s)) * 1e3
            t_i8 = _bench(lambda: int8_gemm.int8_linear(x, q, s)) * 1e3
            keep = int8_gemm.PREFILL_DEQUANT_MIN_M
            try:
                int8_gemm.PREFILL_DEQUANT_MIN_M = 1 << 30
                t_fused = _bench(lambda: int8_gemm.int8_linear(x, q, s)) * 1e3
                int8_gemm.PREFILL_DEQUANT_MIN_M = 1
                t_deq = _bench(lambda: int8_gemm.int8_linear(x, q, s)) * 1e3
            finally:
                int8_gemm.PREFILL_DEQUANT_MIN_M = keep
            tf = 2 * m * n * k / 1e6
            rep(f"{n:>6} {k:>6} {m:>5} | {t_cub:6.1f} ({tf / t_cub:5.0f}) {t_ref:10.1f} "
                f"{t_i8:6.1f} ({tf / t_i8:5.0f}) {t_fused:10.1f} {t_deq:10.1f} | "
                f"{t_cub / t_i8:5.2f}x")


def _tuned_choices(rep):
    rep("autotuned choices (key = m_bucket, N, K, dtypes...):")
    for fn in (int8_gemm._tuned_gemv, int8_gemm._tuned):
        for args in [a for a in ((1, 1 << 30), (8, 1 << 30), (1, 128), (8, 128),
                                 (True, 1 << 30), (False, 1 << 30), (True, 128), (False, 128))
                     if isinstance(a[0], bool) == (fn is int8_gemm._tuned)]:
            for key, cfg in fn(*args).cache.items():
                rep(f"  {fn.__name__}{args}: {key[:3]} -> {cfg.kwargs} w{cfg.num_warps} "
                    f"s{cfg.num_stages}")


SWEEP_GEMV = int8_gemm._GEMV_TILES[1][:6]


def _sweep(rep):
    for n, k in LLAMA:
        qs = [quantize_ref(torch.randn(n, k, device=DEV) * 0.02, 64)
              for _ in range(_copies(n * k))]
        x = torch.randn(1, k, device=DEV, dtype=torch.float16)
        rows = []
        for tile in SWEEP_GEMV:
            t = _graph_us([lambda q=q, s=s: int8_gemm.int8_linear(x, q, s, config=tile)
                           for q, s in qs])
            rows.append((t, tile))
        for t, tile in sorted(rows)[:3]:
            rep(f"  sweep gemv M=1 N={n} K={k}: {t:6.1f} us {n * k / 1e3 / t:5.0f} GB/s {tile}")


def _attention_table(rep):
    rep("decode attention (fp16, Hq=Hkv=32, D=128, cache 4096), CUDA graph: us (GB/s of K+V)")
    for B, L in [(1, 512), (1, 2048), (8, 2048)]:
        sets = []
        for _ in range(_copies(2 * B * 32 * 4096 * 128 * 2)):
            kc = torch.randn(B, 32, 4096, 128, device=DEV, dtype=torch.float16)
            sets.append((kc, torch.randn_like(kc)))
        qd = torch.randn(B, 32, 1, 128, device=DEV, dtype=torch.float16)
        lengths = torch.full((B,), L, device=DEV, dtype=torch.int32)
        t_k = _graph_us([lambda kc=kc, vc=vc: attention.decode_attention(qd, kc, vc, lengths)
                         for kc, vc in sets])
        t_s = _graph_us([lambda kc=kc, vc=vc: F.scaled_dot_product_attention(
            qd, kc[:, :, :L], vc[:, :, :L]) for kc, vc in sets])
        kv = 2 * B * 32 * L * 128 * 2 / 1e3
        rep(f"  B={B} L={L}: triton {t_k:6.1f} us ({kv / t_k:5.0f} GB/s)   SDPA on the sliced "
            f"cache {t_s:6.1f} us ({kv / t_s:5.0f} GB/s)")
        del sets


def _elementwise_table(rep):
    rep("fused elementwise (fp16), CUDA graph: us, kernel vs torch eager ops")
    for rows in [1, 2048]:
        x = torch.randn(rows, 4096, device=DEV, dtype=torch.float16)
        r = torch.randn_like(x)
        w = torch.randn(4096, device=DEV, dtype=torch.float16)
        g = torch.randn(rows, 2 * 11008, device=DEV, dtype=torch.float16)
        h = torch.randn(rows, 10240, device=DEV, dtype=torch.float16)
        hb = torch.randn(10240, device=DEV, dtype=torch.float16)
        pairs = [
            ("add+rmsnorm 4096", lambda: norms.add_norm(x, r, w, None, 1e-6, "rmsnorm"),
             lambda: norms.add_norm_ref(x, r, w, None, 1e-6, "rmsnorm")),
            ("silu_mul 11008", lambda: activations.silu_mul(g),
             lambda: F.silu(g[:, :11008]) * g[:, 11008:]),
            ("bias+gelu 10240", lambda: activations.bias_act(h, hb, "gelu_tanh"),
             lambda: F.gelu(h + hb, approximate="tanh")),
        ]
        rep(f"  rows={rows}: " + "; ".join(
            f"{name} {_graph_us([a]):.1f} vs {_graph_us([b]):.1f}" for name, a, b in pairs))
    x = torch.randn(1, 1, 32, 128, device=DEV, dtype=torch.float16)
    cos, sin = rotary.rotary_cache(4096, 128, device=DEV)
    pos = torch.zeros(1, 1, device=DEV, dtype=torch.long)
    rep(f"  rotary decode (1 token, 32 heads): "
        f"{_graph_us([lambda: rotary.apply_rotary(x, cos, sin, pos)]):.1f} us")



@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("int8", [False, True])
def test_pdl_chain_in_graph_matches_plain_launches(int8, prefetch, monkeypatch):
    """Programmatic dependent launch (kernels/_triton.PDL): a decode-like chain in which every
    kernel reads the one before (norm -> gated GEMV -> GEMV -> attention over a cache -> norm
    ...), captured in a CUDA graph and replayed, gives bit for bit the outputs of the same chain
    launched without PDL. A kernel that read before its wait would race and differ."""
    from dsinfer.kernels import _triton as T
    monkeypatch.setitem(T.PDL, "on", True)
    if not T.pdl_launch(torch.empty(1, device=DEV)):
        pytest.skip("PDL needs compute capability 9.0 and Triton's gdc intrinsics")
    g = torch.Generator(device=DEV).manual_seed(0)
    H, F_, heads, D, L = 4096, 11008, 32, 128, 512
    layers = []
    for _ in range(4):
        w1 = torch.randn(2 * F_, H, device=DEV, generator=g) * 0.02
        w2 = torch.randn(H, F_, device=DEV, generator=g) * 0.02
        layers.append((quantize_ref(w1, 2 * F_), quantize_ref(w2, H)) if int8
                      else (w1.half(), w2.half()))
    norm_w = torch.rand(H, device=DEV, generator=g).half() + 0.5
    kc = torch.randn(1, heads, L, D, device=DEV, generator=g).half()
    vc = torch.randn(1, heads, L, D, device=DEV, generator=g).half()
    lengths = torch.tensor([300], device=DEV, dtype=torch.int32)
    x0 = torch.randn(1, H, device=DEV, generator=g).half()

    def linear(x, w, act=None):
        if int8:
            return int8_gemm.int8_linear(x, w[0], w[1], act=act)
        return int8_gemm.gemv(x, w, act=act)

    def chain():
        h, r = x0, torch.zeros_like(x0)
        for w1, w2 in layers:
            y, r = norms.add_norm(h, r, norm_w, norm="rmsnorm")
            a = linear(y, w1, act="silu_gate")                   # [1, F]
            h = linear(a, w2)                                    # [1, H]
            q = h.view(1, heads, 1, D)
            h = attention.decode_attention(q, kc, vc, lengths).reshape(1, H) + h
        return norms.add_norm(h, r, norm_w, norm="rmsnorm")[0]

    monkeypatch.setitem(T.PDL, "prefetch", prefetch)

    def replayed(on):
        monkeypatch.setitem(T.PDL, "on", on)
        chain()                                              # autotune, compile
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain()
        outs = []
        for _ in range(3):
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            outs.append(out.clone())
        return outs, chain()

    plain, eager_plain = replayed(False)
    with_pdl, eager_pdl = replayed(True)
    assert torch.isfinite(plain[0]).all()
    for o in plain + with_pdl + [eager_pdl]:
        assert torch.equal(o, eager_plain)


def test_timings():
    rep = Report()
    bw = _copy_bandwidth()
    rep(f"HBM copy bandwidth (read + write): {bw:.0f} GB/s")
    _decode_table(rep)
    _prefill_table(rep)
    _attention_table(rep)
    _elementwise_table(rep)
    try:
        _tuned_choices(rep)
    except Exception as e:     # Autotuner internals differ across Triton versions
        rep(f"autotuned choices unavailable: {e!r}")
    if os.environ.get("DSINFER_SWEEP"):
        _sweep(rep)
    rep.save()
    assert math.isfinite(bw)
