"""W8A16 GEMM (kernels.int8_linear) on a GPU: correctness and timings against cuBLAS fp16.

Sweeps tile configs of each path (M = 1 CUDA-core GEMV, tl.dot decode tiles, old GEMV) over the
Llama-7B / GPT-Neo-2.7B shapes (TP 1 and TP 2 halves) and the three scale geometries, each op
replayed from a CUDA graph over weight copies rotated past L2; prints the best config per
shape next to cuBLAS fp16 (F.linear on the fp16 weight) and writes everything to $OUT.
Run from the repo root: python3 bench/kernels_gpu.py [--quick | --acceptance]
  --acceptance  only issue 5's table: the default dispatch (config=None) at M = 1, 16, 256, 4096
                for 4096x4096, 11008x4096 and 4096x11008 (N x K), per-channel and 64 row
                groups, beside cuBLAS fp16 on the same card (targets: >= 1.8x at M = 1,
                >= 0.85x at M = 4096)
  --fp-gemv     the M = 1 GEMVs, fp16 (_gemv_kernel) and int8 per-channel (_w8_gemv_kernel),
                over their tiles on the GPT-Neo-2.7B and Llama-7B projections at TP 1 and 2
                (32 weights a graph, as a decode step streams them; the MLP's first projection
                with its activation): us per call, TB/s, the dispatcher's choice (rule, and
                the autotuner) beside the best tiles
    --hints=W,X[:W,X...]  with --fp-gemv: repeat each shape under these (weight, x) load hints
                (DECODE_PATHS["cache_hints"]: "" / cg / ef / el), e.g. --hints=,:ef,el
    --tp1       with --fp-gemv: only the TP 1 shapes
    --int8-only with --fp-gemv: only the int8 GEMVs
"""
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from dsinfer.kernels import int8_gemm as G
from dsinfer.kernels import quantize_ref

DEV = "cuda"
OUT = os.environ.get("OUT", ".")
SHAPES = [(4096, 4096), (12288, 4096), (11008, 4096), (22016, 4096), (4096, 11008),
          (2048, 4096), (4096, 5504), (7680, 2560), (10240, 2560), (2560, 10240), (32000, 4096)]
GEOMS = {"pc": lambda n: (n, None), "g64": lambda n: (64, None), "k128": lambda n: (n, 128)}
M1_GEOMS = list(GEOMS)      # the geometries the M = 1 sweep times (--quick narrows it)
LOG = []


def log(line=""):
    print(line, flush=True)
    LOG.append(line)


def graph_us(fns, reps=20):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for f in fns:
                f()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / (reps * len(fns)))
    return sorted(ts)[len(ts) // 2]


def copies(nbytes, total=160 * 2 ** 20):
    return max(2, math.ceil(total / nbytes))


def rel(out, ref):
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def copy_bw():
    a = torch.empty(2 ** 28, device=DEV)
    b = torch.empty_like(a)
    import triton
    b.copy_(a)
    t = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=100, return_mode="median")
    return 2 * a.numel() * 4 / t / 1e6


def cfg_name(c):
    if c is None:
        return "default"
    if len(c) == 4:
        return "gemv%dx%d w%d%s" % (c[0], c[1], c[2], " pf" if c[3] else "")
    if len(c) == 5:
        return "old%dx%d" % (c[0], c[1])
    return "dot%dx%dx%d%s w%d s%d" % (c[0], c[1], c[2], " sw" if c[3] else "", c[4], c[5])


def fits(c, geom, k):
    """A config the dispatcher would accept for this geometry (BLOCK_K within column groups)."""
    if geom == "k128" and len(c) == 6 and c[2] > 128:
        return False
    if geom == "k128" and len(c) == 5 and c[1] > 128:
        return False
    return True


def time_case(n, k, m, geom, configs, results, check=True, dtype=torch.float16):
    groups, gs = GEOMS[geom](n)
    nq = copies(n * k)
    qs = [quantize_ref(torch.randn(n, k, device=DEV) * 0.02, groups, gs) for _ in range(nq)]
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    ref = G.int8_linear_ref(x.float(), *qs[0])
    row = {}
    for c in configs:
        if c is not None and not fits(c, geom, k):
            continue
        name = cfg_name(c)
        try:
            if check:
                y = torch.full((m, n), float("nan"), device=DEV, dtype=dtype)
                G.int8_linear(x, *qs[0], out=y, config=c)
                torch.cuda.synchronize()
                e = rel(y, ref)
                if not e < 1e-2:
                    log(f"  WRONG {n}x{k} M={m} {geom} {name}: rel {e:.3e}")
                    row[name] = None
                    continue
            row[name] = graph_us([lambda q=q, s=s: G.int8_linear(x, q, s, config=c) for q, s in qs])
        except Exception as ex:  # noqa: BLE001
            log(f"  FAIL {n}x{k} M={m} {geom} {name}: {type(ex).__name__}: {str(ex)[:300]}")
            row[name] = None
    del qs
    results[(n, k, m, geom)] = row
    return row


def cublas_us(n, k, m, dtype=torch.float16):
    ws = [torch.randn(n, k, device=DEV, dtype=dtype) * 0.02 for _ in range(copies(2 * n * k))]
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    t = graph_us([lambda w=w: F.linear(x, w) for w in ws])
    del ws
    return t


GEMV = list(G._W8_GEMV_TILES) + [(8, 512, 4, True), (32, 512, 8, False), (8, 2048, 8, False),
                                 (2, 2048, 8, False), (2, 1024, 4, False), (2, 4096, 16, False),
                                 (1, 2048, 8, False), (1, 1024, 4, False), (4, 4096, 16, False),
                                 (2, 512, 2, False), (2, 512, 4, False), (2, 1024, 2, False),
                                 (2, 1024, 8, False), (2, 2048, 4, False), (1, 512, 2, False),
                                 (1, 1024, 2, False), (2, 1024, 4, True)]
DOT1 = [(16, 32, 512, False, 4, 3), (16, 16, 1024, False, 4, 2), (16, 32, 256, False, 4, 4),
        (16, 32, 128, False, 4, 6), (16, 64, 128, False, 4, 5)]
DOTS = DOT1 + [(16, 16, 512, False, 4, 3), (16, 64, 256, False, 4, 4), (16, 128, 128, False, 4, 4),
               (16, 32, 512, False, 8, 3), (16, 128, 128, True, 4, 3)]
OLD = {"pc": (8, 1024, 4, False, False), "g64": (8, 1024, 4, False, False),
       "k128": (8, 128, 4, False, False)}


def acceptance():
    """Issue 5's W8A16 table through the dispatcher users get (config=None)."""
    t0 = time.time()
    log(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
        f"triton {__import__('triton').__version__}")
    log("== W8A16 default dispatch vs cuBLAS fp16 (graph-replayed, weights rotated past L2) ==")
    rows = []
    for n, k in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        for m in (1, 16, 256, 4096):
            tc = cublas_us(n, k, m)
            for geom in ("pc", "g64"):
                ti = time_case(n, k, m, geom, [None], {})["default"]
                ratio = tc / ti if ti else float("nan")
                log(f"{n:>6}x{k:<6} M={m:<5} {geom:>4} cuBLAS {tc:8.2f} us  int8 "
                    f"{ti or float('nan'):8.2f} us  {ratio:5.2f}x")
                rows.append(dict(n=n, k=k, m=m, geom=geom, cublas_us=tc, int8_us=ti,
                                 speedup=ratio, device=torch.cuda.get_device_name()))
    log(f"total {time.time() - t0:.0f}s")
    with open(os.path.join(OUT, "kernels_acceptance.json"), "w") as f:
        json.dump(rows, f)


def configure(quick: bool, tiny: bool) -> None:
    """Narrow the sweep tables for a short device lease (--quick) or a smoke run (--tiny)."""
    global SHAPES, GEMV, DOT1, DOTS, M1_GEOMS
    if quick:      # the shapes and configs that decide the defaults
        SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (2048, 4096), (32000, 4096)]
        M1_GEOMS = ["pc", "k128"]
        GEMV = [(8, 1024, 4, False), (16, 512, 4, False), (4, 1024, 4, False),
                (16, 1024, 8, False)]
        DOT1 = [(16, 32, 512, False, 4, 3), (16, 32, 128, False, 4, 6),
                (16, 64, 128, False, 4, 5)]
        DOTS = DOT1 + [(16, 16, 512, False, 4, 3)]
    if tiny:
        SHAPES = SHAPES[:3]
        GEMV = GEMV[:3]
        DOT1 = DOT1[:2]
        DOTS = DOT1


def sweep_m1(res, summary, t0) -> None:
    """M = 1: every shape and geometry, every GEMV / tl.dot config and the old kernel."""
    log("\n== M = 1: us per call (int8 GB/s); best config; vs cuBLAS fp16 ==")
    for n, k in SHAPES:
        tc = cublas_us(n, k, 1)
        for geom in M1_GEOMS:
            cfgs = GEMV + DOT1 + [OLD[geom]]
            row = time_case(n, k, 1, geom, cfgs, res)
            ok = {a: b for a, b in row.items() if b is not None}
            best = min(ok, key=ok.get) if ok else None
            old = row.get(cfg_name(OLD[geom]))
            bg = min((v for a, v in ok.items() if a.startswith("gemv")), default=float("nan"))
            bd = min((v for a, v in ok.items() if a.startswith("dot")), default=float("nan"))
            tb = ok.get(best, float("nan"))
            log(f"{n:>6}x{k:<6} {geom:>4} cuBLAS {tc:6.2f} ({2*n*k/1e3/tc:5.0f}) | old "
                f"{old or float('nan'):6.2f} {tc/(old or float('nan')):4.2f}x | best {tb:6.2f} "
                f"({n*k/1e3/tb:5.0f}) {tc/tb:4.2f}x {best} | gemv {bg:6.2f} dot {bd:6.2f}")
            summary.append(dict(n=n, k=k, m=1, geom=geom, cublas=tc, old=old, best=best,
                                best_us=tb, row=row))
        log(f"   [{time.time() - t0:.0f}s]")


def sweep_small_m(res, summary, t0, quick: bool, tiny: bool) -> None:
    """M = 2..16: the tl.dot decode tiles (and the old GEMV at M <= 4)."""
    log("\n== M = 2..16 (dot tiles; old GEMV at M <= 4) ==")
    shapes = [SHAPES[0], SHAPES[2], SHAPES[4], SHAPES[5]] if not quick else SHAPES[:2]
    ms = (2, 4, 8, 16) if not quick else (2, 8, 16)
    if tiny:
        shapes, ms = SHAPES[:2], (8,)
    for n, k in shapes:
        for m in ms:
            tc = cublas_us(n, k, m)
            for geom in ("g64", "k128"):
                cfgs = DOTS + ([OLD[geom]] if m <= 4 else [])
                row = time_case(n, k, m, geom, cfgs, res)
                ok = {a: b for a, b in row.items() if b is not None}
                best = min(ok, key=ok.get) if ok else None
                tb = ok.get(best, float("nan"))
                top = sorted(ok.items(), key=lambda t: t[1])[:3]
                log(f"{n:>6}x{k:<6} M={m:<2} {geom:>4} cuBLAS {tc:6.2f} | best {tb:6.2f} "
                    f"({n*k/1e3/tb:5.0f}) {tc/tb:4.2f}x | " +
                    "; ".join(f"{a} {b:.2f}" for a, b in top))
                summary.append(dict(n=n, k=k, m=m, geom=geom, cublas=tc, best=best, best_us=tb,
                                    row=row))
        log(f"   [{time.time() - t0:.0f}s]")


def sweep_prefill(summary, quick: bool) -> None:
    """M = 4096 through the default path (dequant + cuBLAS), do_bench medians."""
    import triton
    shapes = [] if quick else [(4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096)]
    log("\n== prefill M = 4096 (default path: dequant + cuBLAS), do_bench median us ==")
    for n, k in shapes:
        w16 = torch.randn(n, k, device=DEV, dtype=torch.float16) * 0.02
        for geom in ("g64", "k128"):
            q, s = quantize_ref(w16.float(), *GEOMS[geom](n))
            x = torch.randn(4096, k, device=DEV, dtype=torch.float16)
            tc = triton.testing.do_bench(lambda: F.linear(x, w16), return_mode="median") * 1e3
            ti = triton.testing.do_bench(lambda: G.int8_linear(x, q, s),
                                         return_mode="median") * 1e3
            e = rel(G.int8_linear(x, q, s), G.int8_linear_ref(x.float(), q, s))
            log(f"{n:>6}x{k:<6} {geom:>4} cuBLAS {tc:7.1f} int8 {ti:7.1f} {tc/ti:4.2f}x "
                f"rel {e:.1e}")
            summary.append(dict(n=n, k=k, m=4096, geom=geom, cublas=tc, best="default",
                                best_us=ti))


FP_GEMV_SHAPES = [(7680, 2560, None), (2560, 2560, None), (10240, 2560, "gelu_tanh"),
                  (2560, 10240, None), (3840, 2560, None), (2560, 1280, None),
                  (5120, 2560, "gelu_tanh"), (2560, 5120, None),
                  (12288, 4096, None), (4096, 4096, None), (22016, 4096, "silu_gate"),
                  (4096, 11008, None), (6144, 4096, None), (4096, 2048, None),
                  (11008, 4096, "silu_gate"), (4096, 5504, None)]
# the tiles that came within ~25% of the best on every shape of the first H200 sweep (all
# (4|8|16, 256|512|1024, 4|8 warps, PREFETCH, REDUCE_K) combinations), best first
FP_GEMV_TILES = [(4, 512, 4, False, False), (4, 1024, 4, False, False), (8, 512, 8, True, False),
                 (8, 1024, 4, False, False), (4, 512, 4, True, False), (8, 512, 4, False, False),
                 (4, 512, 8, False, False), (4, 512, 8, True, False), (8, 512, 8, False, False),
                 (8, 1024, 8, False, False), (4, 1024, 8, False, False), (8, 256, 4, True, False),
                 (4, 256, 4, True, False), (4, 256, 4, False, False), (16, 256, 4, True, False),
                 (8, 256, 4, False, False), (2, 1024, 4, False, False), (2, 512, 4, False, False)]


def _time_tiles(n, k, ws, x, call, tiles):
    """{tile or "rule" / "autotune": us per call} of call(x, w, config) over the weights ws."""
    ref = call(x, ws[0], None).float()
    res = {}
    for c in ["rule", "autotune"] + tiles:
        cfg = None if isinstance(c, str) else c
        G.DECODE_PATHS["m1_tile"] = c if isinstance(c, str) else "rule"
        try:
            y = call(x, ws[0], cfg)
            if not rel(y.float(), ref) < 1e-2:
                log(f"  WRONG {n}x{k} {c}")
                continue
            res[c] = graph_us([lambda w=w: call(x, w, cfg) for w in ws], reps=8)
        except Exception as ex:  # noqa: BLE001
            log(f"  FAIL {n}x{k} {c}: {type(ex).__name__}: {str(ex)[:200]}")
    G.DECODE_PATHS["m1_tile"] = "rule"
    return res


def fp_gemv_sweep():
    """M = 1 decode GEMVs in graph conditions: fp16 (_gemv_kernel) over FP_GEMV_TILES and
    int8 per-channel (_w8_gemv_kernel) over its tiles, each beside the rule / the autotuner."""
    t0 = time.time()
    log(f"device: {torch.cuda.get_device_name()}  SMs "
        f"{torch.cuda.get_device_properties(0).multi_processor_count}")
    bw = copy_bw()
    log(f"copy bandwidth (read+write): {bw:.0f} GB/s")
    rows = []
    hints = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--hints=")), ",")
    hints = [tuple(h.split(",")) for h in hints.split(":")]
    shapes = FP_GEMV_SHAPES
    if "--tp1" in sys.argv:
        shapes = [s for s in shapes if (s[0], s[1]) in
                  {(7680, 2560), (2560, 2560), (10240, 2560), (2560, 10240), (12288, 4096),
                   (4096, 4096), (22016, 4096), (4096, 11008)}]
    kinds = ("int8",) if "--int8-only" in sys.argv else ("fp16", "int8")
    for (n, k, act), kind, hint in ((s, kd, h) for s in shapes for kd in kinds for h in hints):
        G.DECODE_PATHS["cache_hints"] = hint
        if kind == "fp16":
            ws = [torch.randn(n, k, device=DEV, dtype=torch.float16) * 0.02
                  for _ in range(32)]
            call = lambda x, w, c: G.gemv(x, w, config=c, act=act)  # noqa: E731
            tiles, nbytes = FP_GEMV_TILES, 2 * n * k
        else:
            ws = [quantize_ref(torch.randn(n, k, device=DEV) * 0.02, n, None)
                  for _ in range(32)]
            call = lambda x, w, c: G.int8_linear(x, *w, config=c, act=act)  # noqa: E731
            tiles, nbytes = GEMV, n * k
        x = torch.randn(1, k, device=DEV, dtype=torch.float16)
        res = _time_tiles(n, k, ws, x, call, tiles)
        top = sorted((v, str(c)) for c, v in res.items() if not isinstance(c, str))[:4]
        d, a = res.get("rule", float("nan")), res.get("autotune", float("nan"))
        log(f"{kind} {n:>6}x{k:<6} {act or '':>9} hints {','.join(hint):>5} rule {d:6.2f} us "
            f"({nbytes/1e6/d:5.2f} TB/s) autotune {a:6.2f} | best "
            + "; ".join(f"{c} {v:.2f}" for v, c in top))
        rows.append(dict(kind=kind, n=n, k=k, act=act, copy_GBps=bw, hints=hint,
                         tiles={str(c): v for c, v in res.items()},
                         device=torch.cuda.get_device_name()))
        del ws
    G.DECODE_PATHS["cache_hints"] = ("", "")
    log(f"   [{time.time() - t0:.0f}s]")
    with open(os.path.join(OUT, "fp_gemv_sweep.json"), "w") as f:
        json.dump(rows, f)
    with open(os.path.join(OUT, "fp_gemv_sweep.txt"), "w") as f:
        f.write("\n".join(LOG) + "\n")


def main():
    if "-h" in sys.argv or "--help" in sys.argv:
        print(__doc__)
        return
    if "--acceptance" in sys.argv:
        return acceptance()
    if "--fp-gemv" in sys.argv:
        return fp_gemv_sweep()
    tiny = "--tiny" in sys.argv
    quick = "--quick" in sys.argv or tiny
    configure(quick, tiny)
    t0 = time.time()
    log(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
        f"triton {__import__('triton').__version__}  SMs "
        f"{torch.cuda.get_device_properties(0).multi_processor_count}")
    log(f"copy bandwidth (read+write): {copy_bw():.0f} GB/s")
    res, summary = {}, []
    sweep_m1(res, summary, t0)
    sweep_small_m(res, summary, t0, quick, tiny)
    sweep_prefill(summary, quick)
    log(f"total {time.time() - t0:.0f}s")
    with open(os.path.join(OUT, "kernels_gpu.json"), "w") as f:
        json.dump(summary, f)
    with open(os.path.join(OUT, "kernels_gpu.txt"), "w") as f:
        f.write("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
