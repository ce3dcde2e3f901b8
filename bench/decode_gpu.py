"""Decode and prefill speed of dsinfer beside its baselines, on random fp16 weights (issue 5).

Per model shape (`neo`: GPT-Neo-2.7B, `llama`: Llama-7B) and per system it measures
  decode  ms/token at each --batches size: 32-token prompt, 128 new tokens, greedy,
          min_new_tokens = max_new_tokens; CUDA events recorded at every generated token (from
          a generate stopping criterion), ms/token = (last - first) / (steps - 1), so prefill
          and the first token are excluded; after warm-up generate calls;
  prefill tokens/s of one forward over a 512-token prompt at batch 1 (median of 5);
  check   (dsinfer_*, ds) max |logits - HF| / max |HF| of the first forward on the same weights,
          and how many of 16 greedy tokens agree with HF's;
  init    seconds of init_inference / quantize_.
Systems:
  bw            device copy bandwidth and the floor: weight bytes / bandwidth (fp16 and int8)
  hf            HF eager                          hf_static  HF static cache, compiled by generate
  torchao       torchao Int8WeightOnlyConfig + the same compiled static cache
  ds            DeepSpeed init_inference(replace_with_kernel_inject=True) (failures recorded)
  dsinfer_fp16  dsinfer.init_inference(dtype=fp16, replace_with_kernel_inject, enable_cuda_graph)
  dsinfer_int8  the same with int8 weights (--quant: per-channel, or G / G,extra as DeepSpeed's
                quantization_setting=(G, mlp_extra_grouping))
  dsinfer_{fp16,int8}_nograph   injection without CUDA graphs     } batch 1 only
  dsinfer_{fp16,int8}_noinject  plain TP torch modules, no graphs } (--ablation-batches)
Every system builds the same weights from --seed (meta device, then one seeded normal_ per
parameter on the GPU: seconds for 7B). hf/hf_static/torchao/bw run at world size 1 only.

Each result is one JSON line on stdout and appended to $OUT/decode.jsonl (OUT defaults to a
temporary folder); progress lines start with '#'. A failing measurement is recorded as a line
with "error" and the run goes on. Sections not started before --budget seconds are recorded as
skipped and listed at the end with the command that runs them.

On the GPU machine, one call each (each starts no section after --budget 420 s, so it ends within
~8 min on one H100 unless one section is very slow; install line and details in
bench/README.md, "Decode benchmark"):
  python3 bench/decode_gpu.py                                  # neo+llama: bw hf dsinfer_fp16 dsinfer_int8
  python3 bench/decode_gpu.py --systems hf_static,torchao      # compiled baselines, neo+llama
  python3 bench/decode_gpu.py --systems ablations,ds           # dsinfer ablations + DeepSpeed
  dsinfer --num_gpus 2 bench/decode_gpu.py --systems dsinfer_fp16,dsinfer_int8,ds   # TP 2 (x2 machine)
  python3 bench/decode_gpu.py --systems dsinfer_fp16,dsinfer_int8   # TP 1 on that same machine
Anywhere (CPU): python bench/decode_gpu.py --tiny   (2 layers, hidden 64; fp32 on CPU)
                dsinfer --num_procs 2 bench/decode_gpu.py --tiny
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import faulthandler
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist

DEFAULT_SYSTEMS = "bw,hf,dsinfer_fp16,dsinfer_int8"
ABLATIONS = ["dsinfer_fp16_nograph", "dsinfer_int8_nograph", "dsinfer_fp16_noinject", "dsinfer_int8_noinject"]
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
RANK = int(os.environ.get("RANK", "0"))
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", "0"))
T0 = time.perf_counter()


# ---------------------------------------------------------------- output

class Recorder:
    """Rank 0 prints each result as a JSON line and appends it to $OUT/decode.jsonl."""

    def __init__(self, path: str, common: dict):
        self.path, self.common = path, common

    def __call__(self, **fields) -> None:
        if RANK != 0:
            return
        line = json.dumps({**fields, **self.common})
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def say(msg: str) -> None:
    if RANK == 0:
        print(f"# [{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


@contextlib.contextmanager
def attempt(record, **where):
    """Run one measurement; a failure becomes an error line and the run goes on."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every failure is a result here
        record(**where, error=f"{type(e).__name__}: {e}"[:600])
        print(f"# rank {RANK} {where}: {traceback.format_exc(limit=-4)}", file=sys.stderr, flush=True)


def versions() -> dict:
    import transformers
    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - no triton on this machine
        out["triton"] = None
    return out


def device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"device": "cpu"}
    props = torch.cuda.get_device_properties(device)
    return {"device": props.name, "device_uuid": str(getattr(props, "uuid", "")),
            "device_mem_GiB": round(props.total_memory / 2 ** 30, 1)}


# ---------------------------------------------------------------- models

def model_spec(name: str, tiny: bool):
    """(model class, config) of a shape; tiny keeps the structure at 2 layers, hidden 64."""
    import transformers as tf
    if name == "neo":
        kw = dict(hidden_size=2560, num_layers=32, num_heads=20, vocab_size=50257,
                  max_position_embeddings=2048, window_size=256,
                  attention_types=[[["global", "local"], 16]])
        if tiny:
            kw.update(hidden_size=64, num_layers=2, num_heads=4, vocab_size=1000,
                      max_position_embeddings=1024, window_size=16,
                      attention_types=[[["global", "local"], 1]])
        return tf.GPTNeoForCausalLM, tf.GPTNeoConfig(**kw)
    if name == "llama":
        kw = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                  max_position_embeddings=2048)
        if tiny:   # GQA at tiny size, to exercise it
            kw.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
        return tf.LlamaForCausalLM, tf.LlamaConfig(**kw)
    raise SystemExit(f"unknown model {name!r}: choose from neo, llama")


@contextlib.contextmanager
def params_on_meta():
    """Parameters are created on the meta device (no memory, no init cost); buffers (causal
    masks, rotary frequencies) keep their real values."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=False)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def fill_(t: torch.Tensor, name: str, gen: torch.Generator) -> None:
    """HF-like random init: norm scales ~1, everything else N(0, 0.02)."""
    mean = 1.0 if (t.dim() == 1 and name == "weight") else 0.0
    t.normal_(mean, 0.02, generator=gen)


def materialize(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> None:
    """Seeded random weights allocated directly on `device`; tied parameters stay tied."""
    gen = torch.Generator(device=device).manual_seed(seed)
    done = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:
                t = torch.empty(p.shape, dtype=dtype, device=device)
                fill_(t, name, gen)
                done[id(p)] = torch.nn.Parameter(t, requires_grad=False)
            module._parameters[name] = done[id(p)]
    model.to(device)   # the buffers


def meta_model(name: str, args):
    cls, cfg = model_spec(name, args.tiny)
    with params_on_meta():
        return cls(cfg)


def build(name: str, args) -> torch.nn.Module:
    model = meta_model(name, args)
    materialize(model, args.device, args.dtype, args.seed)
    model.config.dtype = args.dtype
    model.generation_config.pad_token_id = 0
    return model.eval()


def weight_bytes(name: str, args) -> dict:
    """fp16 bytes of all parameters, and with the block linears in int8 (scales not counted)."""
    model = meta_model(name, args)
    seen, fp16, int8 = set(), 0, 0
    for mname, module in model.named_modules():
        for p in module._parameters.values():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            fp16 += 2 * p.numel()
            linear = isinstance(module, torch.nn.Linear) and p.dim() == 2 and "lm_head" not in mname
            int8 += p.numel() * (1 if linear else 2)
    return {"params": fp16 // 2, "fp16_bytes": fp16, "int8_bytes": int8}


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- timing

def prompt(vocab: int, batch: int, length: int, seed: int, device) -> torch.Tensor:
    """The same token ids on every rank and for every system."""
    g = torch.Generator().manual_seed(seed + 1000 * batch + length)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_clock_class():
    from transformers import StoppingCriteria

    class StepClock(StoppingCriteria):
        """Never stops generation; marks the time each token is produced (CUDA events on GPU)."""

        def __init__(self, device):
            self.cuda, self.marks = device.type == "cuda", []

        def __call__(self, input_ids, scores, **kwargs):
            if self.cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                self.marks.append(ev)
            else:
                self.marks.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        def ms_per_step(self) -> float:
            if len(self.marks) < 2:
                raise RuntimeError(f"only {len(self.marks)} generation step(s) seen")
            if self.cuda:
                self.marks[-1].synchronize()
                total = self.marks[0].elapsed_time(self.marks[-1])
            else:
                total = (self.marks[-1] - self.marks[0]) * 1e3
            return total / (len(self.marks) - 1)

    return StepClock


def generate(model, ids: torch.Tensor, new: int, clock=None) -> torch.Tensor:
    from transformers import StoppingCriteriaList
    kw = {"stopping_criteria": StoppingCriteriaList([clock])} if clock is not None else {}
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                          min_new_tokens=new, do_sample=False, pad_token_id=0, **kw)


def decode_ms(model, vocab: int, batch: int, args, full_warmup: bool) -> dict:
    """Warm-up generates, then one timed generate of --new tokens."""
    ids = prompt(vocab, batch, args.prompt, args.seed, args.device)
    # compiled / graph-captured systems warm up with the timed shapes (no recompile when timed)
    warm = [args.new, args.new] if full_warmup else [min(16, args.new)]
    with torch.inference_mode():
        for n in warm:
            generate(model, ids, n)
        sync(args.device)
        clock = step_clock_class()(args.device)
        t0 = time.perf_counter()
        out = generate(model, ids, args.new, clock)
        sync(args.device)
        wall = time.perf_counter() - t0
    ms = clock.ms_per_step()
    assert out.shape[1] == ids.shape[1] + args.new, out.shape
    return {"ms_per_token": round(ms, 3), "tokens_per_s": round(batch * 1e3 / ms, 1),
            "steps_timed": len(clock.marks) - 1, "generate_wall_s": round(wall, 3)}


def median_ms(fn, device, warmup: int = 2, reps: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter(); fn(); times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def prefill(model, vocab: int, args) -> dict:
    ids = prompt(vocab, 1, args.prefill, args.seed, args.device)
    with torch.inference_mode():
        ms = median_ms(lambda: model(input_ids=ids), args.device)
    return {"prompt_tokens": args.prefill, "ms": round(ms, 3), "tokens_per_s": round(args.prefill / ms * 1e3, 1)}


def signature(model, vocab: int, args):
    """Logits of the first forward (fp32, CPU) and the greedy continuation, for the HF check."""
    ids = prompt(vocab, 1, args.prompt, args.seed, args.device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits.float().cpu()
        tokens = generate(model, ids, args.check_tokens)[:, ids.shape[1]:].cpu()
    return logits, tokens


def compare(ref, got) -> dict:
    (ref_logits, ref_tokens), (logits, tokens) = ref, got
    rel = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    same = (tokens == ref_tokens)[0].int()
    prefix = int(same.cumprod(0).sum())
    return {"max_rel_logit_diff": float(f"{rel:.3g}"), "greedy_tokens_agree": prefix,
            "greedy_all_agree": prefix == ref_tokens.shape[1], "check_tokens": ref_tokens.shape[1]}


# ---------------------------------------------------------------- systems

class Runner:
    """What a system measures: `model` has generate and __call__ (an HF model or an engine)."""

    def __init__(self, model, full_warmup=False, check=True, prefill=True, extra=None, cleanup=None):
        self.model, self.full_warmup, self.check, self.prefill = model, full_warmup, check, prefill
        self.extra, self.cleanup = extra or {}, cleanup


def prep_hf(name, args, record):
    return Runner(build(name, args), check=False)


def static_cache(model):
    # HF's own recipe: with a static cache, generate compiles the decode step itself
    model.generation_config.cache_implementation = "static"
    return model


def reset_compiler():
    torch._dynamo.reset()


def prep_hf_static(name, args, record):
    return Runner(static_cache(build(name, args)), full_warmup=True, check=False, prefill=False,
                  cleanup=reset_compiler)


def prep_torchao(name, args, record):
    import torchao
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    model = build(name, args)
    t0 = time.perf_counter()
    quantize_(model, Int8WeightOnlyConfig())
    record(section="init", model=name, system="torchao", seconds=round(time.perf_counter() - t0, 2),
           torchao=torchao.__version__)
    return Runner(static_cache(model), full_warmup=True, check=False, cleanup=reset_compiler)


def prep_ds(name, args, record):
    import deepspeed
    model = build(name, args)
    t0 = time.perf_counter()
    eng = deepspeed.init_inference(model, tensor_parallel={"tp_size": WORLD}, dtype=args.dtype,
                                   replace_with_kernel_inject=True)
    record(section="init", model=name, system="ds", seconds=round(time.perf_counter() - t0, 2),
           deepspeed=deepspeed.__version__)
    return Runner(eng.module)


def quant_setting(text: str):
    """--quant per-channel | G | G,extra  ->  quantization_setting for init_inference."""
    from dsinfer.quantize import QuantConfig
    if text == "per-channel":
        return QuantConfig(groups="per-channel")
    groups, _, extra = text.partition(",")
    return (int(groups), extra == "extra")


def _pdl_on():
    """Whether dsinfer's kernels launch with programmatic dependent launch (DSINFER_PDL)."""
    try:
        from dsinfer.kernels import _triton
    except ImportError:
        return None
    return _triton.PDL["on"]


def dsinfer_info() -> dict:
    import importlib.util
    import dsinfer
    from dsinfer.kernels import int8_gemm
    return {"dsinfer": dsinfer.__version__, "dsinfer_path": os.path.dirname(dsinfer.__file__),
            "dsinfer_has_inject": importlib.util.find_spec("dsinfer.inject") is not None,
            "decode_paths": dict(getattr(int8_gemm, "DECODE_PATHS", {})),
            "int8_fast_cvt": getattr(int8_gemm, "FAST_CVT", None),
            "lookahead": os.environ.get("DSINFER_LOOKAHEAD", "auto"),
            "pdl": _pdl_on()}


def prep_dsinfer(name, args, record, int8: bool, inject: bool, graph: bool, system: str):
    import dsinfer
    model = build(name, args)
    kw = dict(dtype=args.dtype, tensor_parallel={"tp_size": WORLD}, replace_with_kernel_inject=inject,
              enable_cuda_graph=graph, max_out_tokens=args.max_out_tokens)
    if int8:
        kw["quantization_setting"] = quant_setting(args.quant)
    t0 = time.perf_counter()
    eng = dsinfer.init_inference(model, **kw)
    sync(args.device)
    extra = {"quant": args.quant if int8 else None, "inject": inject, "cuda_graph": graph}
    record(section="init", model=name, system=system, seconds=round(time.perf_counter() - t0, 2),
           **extra, **dsinfer_info())
    return Runner(eng, full_warmup=graph, extra=extra)


def dsinfer_systems() -> dict:
    out = {}
    for prec in ("fp16", "int8"):
        for suffix, inject, graph in (("", True, True), ("_nograph", True, False), ("_noinject", False, False)):
            system = f"dsinfer_{prec}{suffix}"
            out[system] = (lambda n, a, r, i8=prec == "int8", inj=inject, g=graph, s=system:
                           prep_dsinfer(n, a, r, i8, inj, g, s))
    return out


PREPARE = {"hf": prep_hf, "hf_static": prep_hf_static, "torchao": prep_torchao, "ds": prep_ds,
           **dsinfer_systems()}
CUDA_ONLY = {"bw", "hf_static", "torchao", "ds"}
WORLD1_ONLY = {"bw", "hf", "hf_static", "torchao"}


# ---------------------------------------------------------------- sections

_BW = {}


def copy_bandwidth(device) -> float:
    """Device-to-device copy of 2 GiB, bytes read + written per second (measured once)."""
    if "GBps" not in _BW:
        n = 2 << 30
        a = torch.empty(n, dtype=torch.uint8, device=device)
        b = torch.empty_like(a)
        ms = median_ms(lambda: b.copy_(a), device, warmup=3, reps=10)
        _BW["GBps"] = 2 * n / ms / 1e6
        del a, b
        free()
    return _BW["GBps"]


def section_bw(name, args, record):
    gbps = copy_bandwidth(args.device)
    wb = weight_bytes(name, args)
    record(section="bw", model=name, system="bw", copy_GBps=round(gbps, 1), **wb,
           floor_fp16_ms=round(wb["fp16_bytes"] / gbps / 1e6, 3),
           floor_int8_ms=round(wb["int8_bytes"] / gbps / 1e6, 3))


_REF = {}


def reference(name, args, record):
    """HF eager logits and greedy tokens on the shared weights (once per model); at TP > 1
    also whether every rank built the same weights."""
    if name not in _REF:
        model = build(name, args)
        _REF[name] = signature(model, model.config.vocab_size, args)
        if WORLD > 1:
            record(section="setup", model=name, weights_identical_across_ranks=weights_identical(model))
        del model
        free()
    return _REF[name]


def dequantized_reference(name, args, record):
    """HF eager on the weights the int8 system really holds (each selected weight quantized
    with --quant, then dequantized): separates kernel error from quantization error, which
    on random weights through 32 layers moves logits by several percent."""
    key = (name, args.quant)
    if key not in _REF:
        from dsinfer import specs
        from dsinfer.engine import _quant_config
        from dsinfer.formats import Checkpoint, TensorRef
        from dsinfer.kernels import dequantize_ref
        from dsinfer.quantize import quantized_view
        model = build(name, args)
        spec = specs.for_config(model.config.to_dict())
        params = dict(model.named_parameters())
        refs = [TensorRef(n, tuple(p.shape), p.dtype, load=lambda p=p: p.detach())
                for n, p in params.items()]
        ckpt, _ = quantized_view(Checkpoint("model", model.config.to_dict(), refs), spec,
                                 _quant_config(quant_setting(args.quant)), {})
        by_name = {t.name: t for t in ckpt.tensors}
        with torch.no_grad():
            for n, p in params.items():
                if by_name[n].dtype != torch.int8:
                    continue
                q = by_name[n].load().to(p.device)          # int8, the parameter's layout
                s = by_name[n + specs.SCALE_SUFFIX].load().to(p.device)   # [groups, col_groups]
                if spec.rule_for(n).transposed:              # scales index the [out, in] view
                    p.copy_(dequantize_ref(q.t(), s).t())
                else:
                    p.copy_(dequantize_ref(q, s))
        _REF[key] = signature(model, model.config.vocab_size, args)
        del model, params, refs, ckpt, by_name
        free()
    return _REF[key]


def weights_identical(model) -> bool:
    s = torch.stack([p.double().sum() for p in model.parameters()]).sum().reshape(1)
    lo, hi = s.clone(), s.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(lo.item() == hi.item())


def measure(name, system, runner, args, record):
    model = runner.model
    vocab = model.config.vocab_size
    where = dict(model=name, system=system)
    if runner.check:
        with attempt(record, section="check", **where):
            got = signature(model, vocab, args)
            record(section="check", **where, **compare(reference(name, args, record), got),
                   **runner.extra)
            if runner.extra.get("quant") and (name, args.quant) in _REF:
                record(section="check_dequant", **where, **compare(_REF[(name, args.quant)], got),
                       **runner.extra)
    batches = args.ablation_batches if system in ABLATIONS else args.batches
    for batch in batches:
        with attempt(record, section="decode", batch=batch, **where):
            say(f"{name} {system} decode batch {batch}")
            record(section="decode", **where, batch=batch, prompt_tokens=args.prompt, new_tokens=args.new,
                   **decode_ms(model, vocab, batch, args, runner.full_warmup), **runner.extra)
            if args.lookahead_stats:
                lookahead_stats(model, f"{name} {system} batch {batch}")
    if runner.prefill:
        with attempt(record, section="prefill", **where):
            record(section="prefill", **where, batch=1, **prefill(model, vocab, args), **runner.extra)


def lookahead_stats(model, what: str) -> None:
    """Every rank, to stderr: its look-ahead counts (guessed, hits, misses) and the one-shot
    all-reduce's state (failed flag, status block: dsinfer/fast_allreduce.py), cumulative
    over the runs so far. For studying one-shot sums beside look-ahead (DSINFER_LOOKAHEAD=force)."""
    dec = next((m.dsinfer_decoder for m in model.modules() if hasattr(m, "dsinfer_decoder")), None)
    if dec is None:
        return
    la = dec.lookahead.stats if dec.lookahead is not None else None
    fast = dec.tp.fast
    state = None if fast is None else dict(failed=int(fast.counters[-1].item()),
                                           status=fast.status.tolist(),
                                           calls=fast.counters[:4].tolist())
    print(f"# rank {os.environ.get('RANK', '0')} {what}: look-ahead {la}; one-shot {state}",
          file=sys.stderr, flush=True)


def run_section(name, system, args, record):
    if system in CUDA_ONLY and args.device.type != "cuda":
        return record(section="skipped", model=name, system=system, reason="needs CUDA")
    if system in WORLD1_ONLY and WORLD > 1:
        return say(f"{name} {system}: world size 1 only, skipped")
    if system == "bw":
        with attempt(record, section="bw", model=name, system=system):
            section_bw(name, args, record)
        return
    runner = None
    with attempt(record, section="setup", model=name, system=system):
        if system == "ds" or system.startswith("dsinfer"):
            reference(name, args, record)   # built before the system's model: only one in memory
            if system.startswith("dsinfer_int8"):
                dequantized_reference(name, args, record)
        runner = PREPARE[system](name, args, record)
    if runner is not None:
        measure(name, system, runner, args, record)
        cleanup = runner.cleanup
        del runner
        if cleanup:
            cleanup()
    free()


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default=DEFAULT_SYSTEMS,
                   help=f"comma list, run in this order (default {DEFAULT_SYSTEMS}); 'ablations' = "
                        f"{','.join(ABLATIONS)}; 'all' = every system")
    p.add_argument("--models", default="neo,llama", help="comma list of neo, llama (default both)")
    p.add_argument("--batches", default="1,8", help="decode batch sizes (default 1,8)")
    p.add_argument("--ablation-batches", default="1", help="batch sizes of the _nograph/_noinject runs")
    p.add_argument("--new", type=int, default=128, help="new tokens per timed generate (default 128)")
    p.add_argument("--prompt", type=int, default=32, help="decode prompt length (default 32)")
    p.add_argument("--prefill", type=int, default=512, help="prefill prompt length (default 512)")
    p.add_argument("--check-tokens", type=int, default=16, help="greedy tokens compared with HF")
    p.add_argument("--quant", default="per-channel",
                   help="int8 groups: per-channel (default), G, or G,extra (mlp_extra_grouping)")
    p.add_argument("--max-out-tokens", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, default=420,
                   help="seconds after which no new section starts (default 420)")
    p.add_argument("--tiny", action="store_true", help="2 layers, hidden 64: a check that runs anywhere")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    p.add_argument("--watchdog", type=float, default=0,
                   help="after this many seconds print every thread's Python stack and exit 1 "
                        "(a hang's post-mortem; default off)")
    p.add_argument("--lookahead-stats", action="store_true",
                   help="after each decode run every rank prints its look-ahead hits/misses and "
                        "the one-shot all-reduce's state to stderr")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    groups = {"ablations": ABLATIONS, "all": ["bw", *PREPARE]}
    systems = [x for s in args.systems.split(",") if s for x in groups.get(s, [s])]
    unknown = [s for s in systems if s not in PREPARE and s != "bw"]
    if unknown:
        p.error(f"unknown system(s) {unknown}; choose from bw, {', '.join(PREPARE)}")
    args.systems = systems
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.ablation_batches = [int(b) for b in args.ablation_batches.split(",") if b]
    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.tiny:
        p.error("no CUDA device: real shapes need a GPU; use --tiny to check the script on a CPU")
    args.device = torch.device("cuda", LOCAL_RANK) if cuda else torch.device("cpu")
    args.dtype = torch.float16 if cuda else torch.float32
    return args


def over_budget(args) -> bool:
    """Rank 0 decides, so that every rank skips the same sections."""
    flag = torch.tensor([float(time.perf_counter() - T0 > args.budget)], device=args.device)
    if dist.is_initialized():
        dist.broadcast(flag, src=0)
    return bool(flag.item())


def init_distributed(device) -> None:
    if WORLD == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=300))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.watchdog:
        faulthandler.dump_traceback_later(args.watchdog, exit=True)
    init_distributed(args.device)
    out = os.environ.get("OUT") or os.path.join(tempfile.gettempdir(), "dsinfer-bench")
    os.makedirs(out, exist_ok=True)
    record = Recorder(os.path.join(out, "decode.jsonl"),
                      {"world_size": WORLD, **device_info(args.device), **versions(), "tiny": args.tiny,
                       "dtype": str(args.dtype).replace("torch.", ""),
                       "date": datetime.datetime.now().isoformat(timespec="seconds")})
    say(f"results -> {record.path}; models {args.models}; systems {args.systems}; batches {args.batches}")
    skipped = []
    for name in args.models:
        for system in args.systems:
            if over_budget(args):
                skipped.append((name, system))
                record(section="skipped", model=name, system=system, reason=f"--budget {args.budget:g} s")
                continue
            t0 = time.perf_counter()
            say(f"{name} {system} ...")
            run_section(name, system, args, record)
            say(f"{name} {system} took {time.perf_counter() - t0:.1f}s")
    if skipped:
        say("not run (time budget): rerun with --models {} --systems {}".format(
            ",".join(dict.fromkeys(m for m, _ in skipped)), ",".join(dict.fromkeys(s for _, s in skipped))))
    say(f"done in {time.perf_counter() - T0:.1f}s")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
