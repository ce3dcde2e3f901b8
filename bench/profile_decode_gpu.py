"""Where a dsinfer decode step spends its time (issue 5's "if a target is missed, profile").

On one GPU, for a model shape of bench/decode_gpu.py (random fp16 weights, same seed), after
init_inference(replace_with_kernel_inject=True, enable_cuda_graph=True) and warm-up, it times
per token at --batch:
  generate    HF generate (greedy), CUDA events at every token: what decode_gpu.py reports
  lean_loop   model(input_ids=tok, past_key_values=cache) + argmax, no generate wrapper
  graph       the captured body graph replayed back to back (pure device time of the blocks)
  lm_head     the output projection alone (runs outside the graph, in HF's module)
then profiles --profile-steps eager steps (graphs off: the same kernels, one launch each) and
prints the kernels by device time per step, grouped by name, with the bandwidth each achieved
where it reads weights. One JSON line per number on stdout and in $OUT/profile.jsonl;
the kernel table in $OUT/profile_<model>_<dtype>.txt. `projection` lines time each projection
(qkv, o, up, down) of all layers alone in a graph: ms/step, us/call and TB/s reached.

    python3 bench/profile_decode_gpu.py [--model llama|neo] [--int8] [--batch 1]
    dsinfer --num_gpus 2 bench/profile_decode_gpu.py ...    (TP 2: rank 0's timings)
    ... --prefill 512     one forward over a 512-token prompt instead: device ms, host ms (the
                          Python call alone) and its kernel table
    ... --host            instead of the kernel profile: where the host's time goes in generate
                          (cProfile over one timed generate, graphs and look-ahead on), top
                          functions by own and by cumulative time in $OUT/host_<model>_<dtype>.txt
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_gpu as D  # noqa: E402  (the same model builder and timing helpers)

from dsinfer.inject.decoder import CACHE_FIELD  # noqa: E402  (this transformers' cache kwarg)

OUT = os.environ.get("OUT") or "."


RANK, WORLD = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def record(**kw):
    kw.update(device=torch.cuda.get_device_name(), world_size=WORLD)
    if RANK:                    # under the launcher (TP > 1) rank 0 speaks for the group
        return
    line = json.dumps(kw)
    print(line, flush=True)
    with open(os.path.join(OUT, "profile.jsonl"), "a") as f:
        f.write(line + "\n")


def events_ms(fn, reps: int) -> float:
    """Mean ms per call of `fn` issued back to back (no host sync inside)."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps


def decoder_of(model):
    return next(m.dsinfer_decoder for m in model.modules() if hasattr(m, "dsinfer_decoder"))


class LeanLoop:
    """Greedy decode without HF generate: one forward and one argmax per token."""

    def __init__(self, model, ids):
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True)
        self.model, self.cache = model, out.past_key_values
        self.tok = out.logits[:, -1:].argmax(-1)

    def __call__(self):
        with torch.inference_mode():
            out = self.model(input_ids=self.tok, use_cache=True, **{CACHE_FIELD: self.cache})
            self.tok = out.logits[:, -1:].argmax(-1)


def kernel_table(prof, steps: int) -> list:
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t > 0 and e.device_type.name == "CUDA":
            rows.append((t / steps / 1e3, e.count / steps, e.key))   # ms/step, launches/step
    return sorted(rows, reverse=True)


def write_table(rows, tag, what: str, name: str) -> float:
    """Rank 0 prints the kernel table and writes it to $OUT/<name>; returns its total ms."""
    total = sum(r[0] for r in rows)
    lines = [f"{tag}  kernels {total:.3f} ms/{what} (eager, device time)",
             f"{'ms/' + what:>8} {'share':>6} {'n/' + what:>7}  kernel"]
    lines += [f"{t:8.3f} {t / total:6.1%} {n:7.1f}  {k[:110]}" for t, n, k in rows[:30]]
    text = "\n".join(lines)
    if not RANK:
        print(text, flush=True)
        with open(os.path.join(OUT, name), "w") as f:
            f.write(text + "\n")
    return total


def prefill_profile(model, a, tag) -> int:
    """One forward over an a.prefill-token prompt: device ms (events, back to back), host ms
    (wall time of the Python call alone, no sync inside) and the kernels of 3 forwards."""
    ids = D.prompt(model.config.vocab_size, 1, a.prefill, 0, torch.device("cuda"))
    tag = dict(tag, prompt_tokens=a.prefill)

    def fwd():
        with torch.inference_mode():
            model(input_ids=ids)
    for _ in range(3):
        fwd()
    torch.cuda.synchronize()
    record(what="prefill", ms=round(events_ms(fwd, 5), 3), **tag)
    t0 = time.perf_counter()
    fwd()
    host = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    record(what="prefill_host", ms=round(host, 3), **tag)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 with_stack=True) as prof:
        for _ in range(3):
            fwd()
        torch.cuda.synchronize()
    name = f"prefill{a.prefill}_{a.model}_{tag['dtype']}_tp{WORLD}"
    total = write_table(kernel_table(prof, 3), tag, "call", f"profile_{name}.txt")
    record(what="prefill_kernels", ms=round(total, 3), **tag)
    host_table(prof, tag, f"host_{name}.txt")
    return 0


SYNCS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
         "cudaMemcpy", "cudaEventSynchronize")   # host calls that wait for the GPU


def host_table(prof, tag, name: str) -> None:
    """Rank 0: host ops by self CPU time, then every call that waits for the GPU with the
    Python lines it came from (a forward that syncs cannot run ahead of its kernels)."""
    if RANK:
        return
    text = [str(tag), prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=35)]
    waits = [e for e in prof.key_averages(group_by_stack_n=8) if e.key.startswith(SYNCS)]
    for e in waits:
        text.append(f"{e.key}  x{e.count}  self cpu {e.self_cpu_time_total / 1e3:.3f} ms")
        text += [f"    {frame}" for frame in e.stack if "site-packages/torch" not in frame]
    record(what="host_waits", calls={e.key: e.count for e in waits}, **tag)
    with open(os.path.join(OUT, name), "w") as f:
        f.write("\n".join(text) + "\n")


def ab_paths(model, dec, args, a, tag) -> int:
    """Same weights, same process: one DECODE_PATHS (or DECODE_HEAD) setting, then the
    other(s); generate ms/token, graph replay ms and whether the greedy tokens stay those of
    the first setting, for each (`default` marks the tree's setting)."""
    from dsinfer.inject.head import DECODE_HEAD
    from dsinfer.kernels import int8_gemm as G
    if a.ab == "lookahead":
        return ab_lookahead(model, dec, args, a, tag)
    if a.ab == "pdl":
        return ab_pdl(model, dec, args, a, tag)
    if a.ab == "launch_bound":
        return ab_launch_bound(model, dec, args, a, tag)
    table = G.DECODE_PATHS
    if a.ab in ("act_epilogue", "balanced_rows"):
        key, settings = a.ab, (True, False)
    elif a.ab == "cache_hints":              # (weight, x) load hints, twice each
        key, settings = a.ab, (("", ""), ("ef", "el"), ("", ""), ("ef", "el"))
    elif a.ab == "w8_tile":                  # the int8 one-row tile rule: this tree's,
        table, key = G._M1_RULES, "w8_gemv"  # session 10's 2-row one, session 9's 4-row one
        settings = (G._w8_gemv_m1_tile, _w8_rule_2row, _w8_rule_4row) * 2
    elif a.ab == "m1_tile":
        key, settings = a.ab, ("rule", "autotune")
    elif a.ab == "head_in_step":
        table, key, settings = DECODE_HEAD, "in_step", (False, True, False, True)
    elif a.ab == "early":                    # small kernels' loads before the PDL wait, or after
        from dsinfer.kernels import _triton as T
        table, key, settings = T.PDL, "early", (False, True, False, True)
    else:
        key = "int8_m1" if a.int8 else "fp_m_le_4"
        settings = ("gemv", "dot") if a.int8 else ("triton", "cublas")
    default = table[key]
    ids = D.prompt(model.config.vocab_size, a.batch, args.prompt, args.seed, args.device)
    first = None
    for path in settings:
        table[key] = path
        dec.graphs.reset()
        gen = D.decode_ms(model, model.config.vocab_size, a.batch, args, full_warmup=True)
        g = dec.graphs.graphs[a.batch]
        with torch.inference_mode():
            toks = D.generate(model, ids, 32)
        first = toks if first is None else first
        record(what="ab", setting=key, path=getattr(path, "__name__", path),
               default=path == default,
               ms_per_token=gen["ms_per_token"],
               graph_ms=round(events_ms(g.graph.replay, a.steps), 3),
               tokens_as_first=bool(torch.equal(toks, first)), **tag)
    table[key] = default
    return 0


def _w8_rule_2row(N: int, K: int, gated: bool = False) -> tuple:
    """The int8 one-row GEMV tile rule of session 10 (2-row programs), for --ab w8_tile."""
    return (2, 2048, 8, False) if N <= 3072 and K >= 8192 else (2, 1024, 4, False)


def _w8_rule_4row(N: int, K: int, gated: bool = False) -> tuple:
    """The int8 one-row GEMV tile rule of sessions 6-9 (4-row programs), for --ab w8_tile."""
    if K >= 6144 or (K >= 4096 and N <= 12288):
        return (4, 2048, 8, False)
    return (4, 1024, 4, False)


def ab_pdl(model, dec, args, a, tag) -> int:
    """Programmatic dependent launch (kernels/_triton.py) with the GEMVs' L2 prefetch, without
    it, and off, graphs recaptured: generate ms/token and graph replay ms, twice over."""
    from dsinfer.kernels import _triton as T
    default = dict(T.PDL)
    ids = D.prompt(model.config.vocab_size, a.batch, args.prompt, args.seed, args.device)
    first = None
    for on, pf in [(True, True), (True, False), (False, True)] * 2:
        T.PDL.update(on=on, prefetch=pf)
        dec.graphs.reset()
        gen = D.decode_ms(model, model.config.vocab_size, a.batch, args, full_warmup=True)
        g = dec.graphs.graphs[a.batch]
        with torch.inference_mode():   # the same greedy tokens either way (graphs replayed)
            toks = D.generate(model, ids, 32)
        first = toks if first is None else first
        record(what="ab", setting="pdl", path=on, l2_prefetch=on and pf,
               default=on == default["on"],
               ms_per_token=gen["ms_per_token"],
               graph_ms=round(events_ms(g.graph.replay, a.steps), 3),
               tokens_as_first=bool(torch.equal(toks, first)), **tag)
    T.PDL.update(default)
    return 0


def ab_launch_bound(model, dec, args, a, tag) -> int:
    """The most fusing small launches away could save: decode steps with the RoPE + KV-cache
    write and / or the add+norm launches replaced by nothing (outputs WRONG; times only; the
    greedy tokens, and so look-ahead's hits, change too: read graph_ms)."""
    from dsinfer import kernels as K
    real = {"qkv": K.qkv_to_cache, "norm": K.add_norm}

    def no_qkv(qkv, *rest, **kw):       # decode steps only (the prompt still fills the cache)
        return None if qkv.shape[1] == 1 else real["qkv"](qkv, *rest, **kw)

    def no_norm(x, residual, *rest, **kw):
        if x.shape[1] != 1:
            return real["norm"](x, residual, *rest, **kw)
        return x, (x if residual is None else residual)

    settings = ("as_is", "no_qkv_cache", "no_add_norm", "neither", "as_is", "no_qkv_cache")
    try:
        for name in settings:
            K.qkv_to_cache = no_qkv if name in ("no_qkv_cache", "neither") else real["qkv"]
            K.add_norm = no_norm if name in ("no_add_norm", "neither") else real["norm"]
            dec.graphs.reset()
            gen = D.decode_ms(model, model.config.vocab_size, a.batch, args, full_warmup=True)
            g = dec.graphs.graphs[a.batch]
            record(what="ab", setting="launch_bound", path=name, default=name == "as_is",
                   ms_per_token=gen["ms_per_token"],
                   graph_ms=round(events_ms(g.graph.replay, a.steps), 3), **tag)
    finally:
        K.qkv_to_cache, K.add_norm = real["qkv"], real["norm"]
    return 0


def ab_lookahead(model, dec, args, a, tag) -> int:
    """Guessed decode steps (dsinfer/inject/lookahead.py) on, then off: generate ms/token."""
    la = dec.lookahead
    for on in (True, False):
        dec.lookahead = la if on else None
        before = dict(la.stats) if la is not None else {}
        gen = D.decode_ms(model, model.config.vocab_size, a.batch, args, full_warmup=True)
        after = la.stats if la is not None else {}
        record(what="ab", setting="lookahead", path="on" if on else "off", default=on,
               ms_per_token=gen["ms_per_token"],
               hits=after.get("hits", 0) - before.get("hits", 0) if on else 0,
               misses=after.get("misses", 0) - before.get("misses", 0) if on else 0, **tag)
    dec.lookahead = la
    return 0


PROJECTIONS = (("qkv", None), ("o", None), ("up", "act"), ("down", None))


def projections(dec, batch: int, steps: int, tag) -> None:
    """Each projection of every layer alone, in a CUDA graph of its 32 (n_layer) GEMVs over
    distinct weights back to back (so each streams from HBM, as in a decode step): ms per
    step and the bandwidth it reached (weight bytes / time)."""
    blocks = dec.blocks
    for name, act in PROJECTIONS:
        lins = [getattr(b.w, name) for b in blocks]
        k = lins[0].weight.shape[1]
        x = torch.randn(batch, 1, k, device="cuda", dtype=torch.float16)
        a = blocks[0].cfg.act if act else None

        def run():
            for lin in lins:
                lin.matmul(x, bias=True, act=a)
        with torch.inference_mode():
            run()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                run()
        ms = events_ms(g.replay, steps)
        nbytes = sum(t.numel() * t.element_size() for lin in lins for t in lin.tensors())
        record(what="projection", name=name, shape=list(lins[0].weight.shape), act=a,
               ms_per_step=round(ms, 4), us_per_call=round(1e3 * ms / len(lins), 2),
               tb_per_s=round(nbytes / ms / 1e9, 3), **tag)


def host_profile(model, args, a, tag) -> int:
    """HF generate of a.steps tokens under cProfile (after the warm-up generates of the timing
    above): host ms per token, and the functions that spend it."""
    import cProfile
    import io
    import pstats
    ids = D.prompt(model.config.vocab_size, a.batch, 32, 0, args.device)
    prof = cProfile.Profile()
    with torch.inference_mode():
        D.sync(args.device)
        t0 = time.perf_counter()
        prof.enable()
        D.generate(model, ids, a.steps)
        prof.disable()
        D.sync(args.device)
    ms = (time.perf_counter() - t0) * 1e3 / a.steps
    record(what="host_profile", ms_per_token_profiled=round(ms, 3), **tag)
    if RANK:
        return 0
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text).strip_dirs()
    for key in ("tottime", "cumulative"):
        stats.sort_stats(key).print_stats(45)
    with open(os.path.join(OUT, f"host_{tag['model']}_{tag['dtype']}.txt"), "w") as f:
        f.write(f"{tag} generate of {a.steps} tokens under cProfile: {ms:.3f} ms/token\n")
        f.write(text.getvalue())
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama", choices=["llama", "neo"])
    p.add_argument("--int8", action="store_true")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--profile-steps", type=int, default=8)
    p.add_argument("--ab", nargs="?", const="path",
                   choices=["path", "act_epilogue", "balanced_rows", "lookahead", "pdl",
                            "m1_tile", "head_in_step", "cache_hints", "w8_tile",
                            "launch_bound", "early"],
                   help="instead of the profile, each setting in turn with graphs recaptured in "
                        "the same run: 'path' (default) the decode GEMMs (fp16: triton | cublas;"
                        " int8: gemv | dot), 'act_epilogue' the MLP activation in the GEMV "
                        "epilogue or after it, 'balanced_rows' GEMV tiles chosen to spread "
                        "evenly over the SMs or not, 'lookahead' guessed decode steps on or off, "
                        "'m1_tile' the M = 1 GEMV tiles by rule or by the autotuner, "
                        "'head_in_step' the LM head outside the decode graph or inside it, "
                        "'cache_hints' the GEMVs' load hints (none / weights evict-first + x "
                        "evict-last), 'w8_tile' the int8 one-row tile rule (this tree's / "
                        "session 10's 2-row / session 9's 4-row), twice each; "
                        "'launch_bound' the RoPE + cache-write and add+norm launches replaced "
                        "by nothing (wrong outputs: the bound on fusing them away); "
                        "'early' the small kernels' loads of what the kernel before cannot "
                        "write, before the PDL wait or after it")
    p.add_argument("--prefill", type=int, default=0, metavar="N",
                   help="instead of decode: one forward over an N-token prompt (batch 1), its "
                        "device time, host time and kernel table")
    p.add_argument("--host", action="store_true",
                   help="instead of the kernel profile: cProfile of one generate (host time per "
                        "token, top functions)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # launcher
    a = p.parse_args(argv)
    import dsinfer
    args = D.parse_args([])
    # under `dsinfer --num_gpus N` each rank builds the same weights and init_inference shards
    # them (TP N); the timings are rank 0's, with the all-reduces inside the graphs
    args.device, args.dtype = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))), torch.float16
    torch.cuda.set_device(args.device)
    model = D.build(a.model, args)
    kw = dict(dtype=torch.float16, replace_with_kernel_inject=True, enable_cuda_graph=True)
    if a.int8:
        kw["quantization_setting"] = D.quant_setting("per-channel")
    model = dsinfer.init_inference(model, **kw).module
    tag = dict(model=a.model, dtype="int8" if a.int8 else "fp16", batch=a.batch)
    if a.prefill:
        return prefill_profile(model, a, tag)
    args.new, args.prompt = a.steps, 32
    gen = D.decode_ms(model, model.config.vocab_size, a.batch, args, full_warmup=True)
    record(what="generate", ms_per_token=gen["ms_per_token"], **tag)

    ids = D.prompt(model.config.vocab_size, a.batch, 32, 0, args.device)
    loop = LeanLoop(model, ids)
    for _ in range(3):
        loop()
    record(what="lean_loop", ms_per_token=round(events_ms(loop, a.steps), 3), **tag)

    dec = decoder_of(model)
    g = dec.graphs.graphs[a.batch]
    record(what="graph", ms_per_token=round(events_ms(g.graph.replay, a.steps), 3), **tag)
    h = torch.randn(a.batch, 1, model.config.hidden_size, device="cuda", dtype=torch.float16)
    head = model.get_output_embeddings()
    with torch.inference_mode():
        record(what="lm_head", ms_per_token=round(events_ms(lambda: head(h), 50), 3), **tag)

    if a.ab:
        return ab_paths(model, dec, args, a, tag)
    if a.host:
        return host_profile(model, args, a, tag)
    projections(dec, a.batch, a.steps, tag)
    graphs, dec.graphs = dec.graphs, None      # eager steps: one profiler record per kernel
    dec.lookahead = None                       # (and no guessed steps beside them)
    loop = LeanLoop(model, ids)
    loop()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(a.profile_steps):
            loop()
        torch.cuda.synchronize()
    dec.graphs = graphs
    total = write_table(kernel_table(prof, a.profile_steps), tag, "step",
                        f"profile_{a.model}_{tag['dtype']}_b{a.batch}_tp{WORLD}.txt")
    if RANK:
        return 0
    record(what="eager_kernels", ms_per_token=round(total, 3), **tag)
    from dsinfer.kernels import int8_gemm
    record(what="dispatch", **int8_gemm.DECODE_PATHS, **tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
