"""Kernel injection (issue 5): every causal family's HF blocks replaced by fused blocks over a
static KV cache gives plain HF's logits (fp32, rel. 1e-4) and the same 16 greedy tokens, at TP 1
and TP 2 (gloo ranks under the launcher), also for left-padded batches, beam search and int8.
On this CPU the fused blocks run the kernels' torch references."""
import copy

import pytest
import torch
import transformers as tf

import dsinfer
from dsinfer.formats import CheckpointError
from dsinfer import kernels
from dsinfer.inject.decoder import CACHE_FIELD
from dsinfer.reshard import reshard
from helpers import child_env, hf_models
from test_runtime import CAUSAL, SUPPORT, launch, results, workdir  # noqa: F401 (fixture)

GEN = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)


def injected(model) -> bool:
    return any(type(m).__name__ == "BlockModule" for m in model.modules())


def rel(a, b) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("arch", CAUSAL)
def test_fused_blocks_equal_hf_in_process(arch):
    ref = hf_models.build(arch)
    engine = dsinfer.init_inference(copy.deepcopy(ref), replace_with_kernel_inject=True)
    assert injected(engine.module), f"{arch}: no fused blocks were installed"
    x = hf_models.inputs(ref)
    with torch.no_grad():
        assert rel(ref(**x).logits, engine.module(**x).logits) <= 1e-4
    ids = x["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :4] = 0                                              # left padding
    for kw in ({}, dict(attention_mask=mask, pad_token_id=0)):
        assert torch.equal(ref.generate(ids, **GEN, **kw), engine.module.generate(ids, **GEN, **kw))
    beams = dict(max_new_tokens=8, num_beams=3, do_sample=False, attention_mask=mask,
                 pad_token_id=0)
    assert torch.equal(ref.generate(ids, **beams), engine.module.generate(ids, **beams))


VARIANTS = [
    ("mistral", dict(sliding_window=6)),                  # windows shorter than the prompt
    ("qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                   rope_theta=500000.0)),
    ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    ("llama", dict(attention_bias=True, mlp_bias=True)),
    ("gpt2", dict(scale_attn_weights=False)),
]


@pytest.mark.parametrize("arch,overrides", VARIANTS,
                         ids=[f"{a}-{'-'.join(o)}" for a, o in VARIANTS])
def test_config_variants(arch, overrides):
    ref = hf_models.build(arch, **overrides)
    engine = dsinfer.init_inference(copy.deepcopy(ref), replace_with_kernel_inject=True)
    assert injected(engine.module)
    x = hf_models.inputs(ref, seq=24)
    with torch.no_grad():
        assert rel(ref(**x).logits, engine.module(**x).logits) <= 1e-4
    ids = x["input_ids"]
    assert torch.equal(ref.generate(ids, **GEN), engine.module.generate(ids, **GEN))


def test_uncovered_variant_keeps_the_torch_modules():
    ref = hf_models.build("opt", do_layer_norm_before=False)      # OPT-350m's post-norm
    engine = dsinfer.init_inference(copy.deepcopy(ref), replace_with_kernel_inject=True)
    assert not injected(engine.module)
    x = hf_models.inputs(ref)
    with torch.no_grad():
        assert rel(ref(**x).logits, engine.module(**x).logits) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_assisted_and_sampled_generation(arch):
    """Prompt-lookup decoding verifies several tokens per step and rolls the rejected ones back
    (cache.crop); sampling with num_return_sequences expands the batch before the first step."""
    ref = hf_models.build(arch)
    engine = dsinfer.init_inference(copy.deepcopy(ref), replace_with_kernel_inject=True)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([ids, ids, ids], dim=1)             # repeats: lookup finds candidates
    for extra in (dict(prompt_lookup_num_tokens=3),
                  dict(do_sample=True, top_k=5, num_return_sequences=2)):
        kw = {**GEN, **extra, "pad_token_id": 0}
        torch.manual_seed(0)
        want = ref.generate(ids, **kw)
        torch.manual_seed(0)
        assert torch.equal(want, engine.module.generate(ids, **kw)), extra


def test_unfused_weights_are_freed_layer_by_layer(monkeypatch):
    """The peak while injecting is the model plus one layer's fused copies: when layer i is
    fused, the HF blocks of layers 0..i-1 (and their separate Q/K/V weights) are gone."""
    import gc
    import weakref

    from dsinfer.inject.archs.llama import Llama
    model = hf_models.build("llama", num_hidden_layers=4)
    refs, alive_at = [], []
    real_layers, real_weights = Llama.layers, Llama.block_weights

    def layers(self, body):          # the loaded (tensor-parallel) layers, before fusing
        found = real_layers(self, body)
        refs.extend(weakref.ref(layer.self_attn.q_proj) for layer in found)
        return found

    def block_weights(self, layer):
        gc.collect()
        alive_at.append(sum(r() is not None for r in refs))
        return real_weights(self, layer)
    monkeypatch.setattr(Llama, "layers", layers)
    monkeypatch.setattr(Llama, "block_weights", block_weights)
    engine = dsinfer.init_inference(model, replace_with_kernel_inject=True)
    assert injected(engine.module)
    assert alive_at == [4, 3, 2, 1], alive_at


def test_manual_decode_with_returned_cache():
    ref = hf_models.build("llama")
    engine = dsinfer.init_inference(copy.deepcopy(ref), replace_with_kernel_inject=True)
    ids = hf_models.inputs(ref)["input_ids"]
    with torch.no_grad():
        full = ref(ids).logits[:, -1]
        out = engine.module(ids[:, :-1], use_cache=True)
        cache = out[CACHE_FIELD]               # `cache` in newer transformers, else past_key_values
        step = engine.module(ids[:, -1:], **{CACHE_FIELD: cache}).logits[:, -1]
        assert rel(full, step) <= 1e-4
        with pytest.raises(CheckpointError, match="batch changed"):
            engine.module(ids[:1, -1:], **{CACHE_FIELD: cache})
        engine.module(ids)                                   # a new sequence ...
        with pytest.raises(CheckpointError, match="earlier sequence"):
            engine.module(ids[:, -1:], **{CACHE_FIELD: cache})   # ... retires the old cache


def test_cache_grows_past_max_out_tokens():
    ref = hf_models.build("gpt2")
    engine = dsinfer.init_inference(copy.deepcopy(ref), replace_with_kernel_inject=True,
                                    max_out_tokens=8)
    ids = hf_models.inputs(ref)["input_ids"]
    assert torch.equal(ref.generate(ids, **GEN), engine.module.generate(ids, **GEN))


def test_bert_fused_encoder_equals_hf():
    ref = hf_models.build("bert")
    engine = dsinfer.init_inference(copy.deepcopy(ref), replace_with_kernel_inject=True)
    assert injected(engine.module)
    x = hf_models.inputs(ref)
    mask = torch.ones_like(x["input_ids"])
    mask[1, 8:] = 0                                               # right padding
    with torch.no_grad():
        a = ref(**x, attention_mask=mask).logits
        b = engine.module(**x, attention_mask=mask).logits
    assert rel(a[0], b[0]) <= 1e-4 and rel(a[1, :8], b[1, :8]) <= 1e-4


@pytest.mark.parametrize("world,cls", [(1, tf.BertForMaskedLM), (2, tf.BertForMaskedLM),
                                       (2, tf.BertModel), (2, tf.BertForSequenceClassification)])
def test_bert_fused_encoder_under_the_launcher(world, cls, tmp_path):
    """TP 2 (and a TP 2 checkpoint re-sharded at load for world 1): logits, or last hidden
    state and pooler output, of non-padding positions equal HF."""
    torch.manual_seed(0)
    model = cls(tf.BertConfig(**hf_models.CONFIGS["bert"][1])).eval()
    with torch.no_grad():                    # norms at 1 and biases at 0 would hide mix-ups
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    src = hf_models.save(model, tmp_path / "hf")
    reshard(src, tmp_path / "tp2", tp=2, progress=False)
    launch(world, SUPPORT / "bert_inject_worker.py", src, tmp_path / "tp2", tmp_path / "out")
    for rank, r in enumerate(results(tmp_path / "out", world)):
        assert r["injected"], rank
        assert r["rel_err"] and max(r["rel_err"].values()) <= 1e-4, (rank, r["rel_err"])


@pytest.mark.parametrize("world,head_in_step", [(1, False), (2, False), (2, True)],
                         ids=["tp1", "tp2", "tp2-head-in-step"])
def test_fused_blocks_under_the_launcher(world, head_in_step, workdir, tmp_path,  # noqa: F811
                                         monkeypatch):
    cases = [f"{a}:tp{world}:inject" for a in CAUSAL]
    if world == 2:   # with guessed decode steps (lookahead.py), as on GPUs: the LM head's
        monkeypatch.setenv("DSINFER_LOOKAHEAD", "1")   # all-gather runs in each guess
        cases += ["llama:int8tp2:int8:inject", "gpt2:tp2:batch:inject", "bloom:tp2:batch:inject",
                  "gpt_neox:tp2:batch:inject"]
    if head_in_step:   # the vocab-parallel head and its all-gather inside each step instead
        monkeypatch.setenv("DSINFER_HEAD_IN_STEP", "1")
        cases = ["llama:tp2:inject", "opt:tp2:inject", "gpt2:tp2:batch:inject"]
    launch(world, SUPPORT / "runtime_worker.py", workdir, tmp_path / "out", *cases)
    for rank, res in enumerate(results(tmp_path / "out", world)):
        for case, r in res.items():
            assert r["injected"], (rank, case)
            assert r["rel_err"] <= (2e-2 if ":int8" in case else 1e-4), (rank, case, r["rel_err"])
            assert r["generate_same"], (rank, case)
        # logits made ahead answer HF's head calls: look-ahead's guesses or the step's own
        # (not where the mask has holes: OPT's test prompt holds its pad id, so no one-token
        # steps there); at TP 1 on a CPU neither is on
        served = {case: r["head_served"] for case, r in res.items()}
        assert (served["llama:tp2:inject"] > 0 if world == 2
                else not any(served.values())), (rank, served)


def test_fused_blocks_through_the_triton_kernels():
    """The same blocks with their Triton kernels (interpreter, CPU) instead of the references:
    add+norm, activations, int8/fp GEMV where chosen, QKV -> cache with RoPE, decode attention."""
    import json
    import subprocess
    import sys
    archs = ["llama", "gpt2", "gpt_neox", "gptj", "bloom", "gpt_neo", "opt", "llama:int8",
             "gpt2:int8"]
    env = child_env(SUPPORT, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(SUPPORT / "inject_triton_worker.py"), *archs],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [row["arch"] for row in rows] == archs
    for row in rows:
        assert row["injected"] and row["rel_err"] <= 1e-4 and row["generate_same"], row
        assert row["padded_same"] and row["single_same"], row


def test_padded_decode_paths(monkeypatch):
    """Decode steps of a left-padded batch run decode_attention with each row's padding
    length (the path a CUDA graph captures); a mask with a hole inside falls back to SDPA with
    the mask. Both give HF's tokens."""
    ref = hf_models.build("llama")
    engine = dsinfer.init_inference(copy.deepcopy(ref), replace_with_kernel_inject=True)
    seen = []
    real = kernels.decode_attention

    def spy(*args, first_key=None, **kw):
        seen.append(None if first_key is None else first_key.tolist())
        return real(*args, first_key=first_key, **kw)

    monkeypatch.setattr(kernels, "decode_attention", spy)
    ids = hf_models.inputs(ref)["input_ids"]
    left = torch.ones_like(ids)
    left[1, :4] = 0
    holes = left.clone()
    holes[0, 5] = 0
    for mask, want in ((left, [0, 4]), (holes, None)):
        seen.clear()
        kw = dict(GEN, attention_mask=mask, pad_token_id=0)
        assert torch.equal(ref.generate(ids, **kw), engine.module.generate(ids, **kw))
        if want is None:
            assert not seen, "a mask with holes must not take the left-padding decode path"
        else:
            assert seen and all(f == want for f in seen), seen


def test_padding_inside_a_later_chunk_is_honoured():
    """A left-padded prefill, then a multi-token continuation whose mask pads some new tokens:
    those keys stay masked (the decode kernel's per-row prefix would not cover them)."""
    ref = hf_models.build("llama")
    engine = dsinfer.init_inference(copy.deepcopy(ref), replace_with_kernel_inject=True)
    ids = hf_models.inputs(ref)["input_ids"]
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :4] = 0                    # left padding of the prompt
    mask[0, 13] = 0                    # a padded token inside the continuation
    with torch.no_grad():
        first = engine.module(input_ids=ids, attention_mask=mask[:, :12], use_cache=True)
        cache = getattr(first, CACHE_FIELD, None) or first.past_key_values
        more = torch.randint(0, ref.config.vocab_size, (2, 4))
        got = engine.module(input_ids=more, attention_mask=mask, use_cache=True,
                            **{CACHE_FIELD: cache}).logits
        full = torch.cat([ids, more], 1)
        want = ref(input_ids=full, attention_mask=mask).logits[:, 12:]
    keep = mask[:, 12:].bool()         # logits at padded positions are not defined
    assert rel(want[keep], got[keep]) <= 1e-4


def test_graph_capture_retries_without_pdl(monkeypatch, caplog):
    """A driver that cannot capture programmatic dependent launches: the capture is tried once
    more with PDL off (and a warning says so) instead of decoding without graphs; a second
    refusal gives up on graphs as before."""
    from dsinfer.inject import graphs as G
    from dsinfer.kernels import _triton as T

    class Stub(G.DecodeGraphs):
        def __init__(self):
            super().__init__(decoder=type("D", (), {"graphs": "set"})())
            self.tries = []

        def _capture(self, B, start):
            self.tries.append(T.PDL["on"])
            if T.PDL["on"] or self.always_fail:
                raise RuntimeError("operation not permitted when stream is capturing")
            return "graph"

    monkeypatch.setitem(T.PDL, "on", True)
    s = Stub()
    s.always_fail = False
    assert s._capture_or_none(1, 4) == "graph" and s.tries == [True, False]
    assert T.PDL["on"] is False and s.decoder.graphs == "set"
    assert "without programmatic dependent launch" in caplog.text
    caplog.clear()

    monkeypatch.setitem(T.PDL, "on", True)
    s = Stub()
    s.always_fail = True
    assert s._capture_or_none(1, 4) is None and s.tries == [True, False]
    assert s.decoder.graphs is None and "decoding without graphs" in caplog.text


def test_a_failed_one_shot_sum_stops_the_forward():
    """dsinfer.fast_allreduce: a one-shot sum that gave up (its status block says so) makes the
    next forward raise that one line instead of returning wrong logits."""
    from dsinfer.fast_allreduce import status_failure
    ref = hf_models.build("llama")
    model = dsinfer.init_inference(copy.deepcopy(ref), replace_with_kernel_inject=True).module
    dec = next(m.dsinfer_decoder for m in model.modules() if hasattr(m, "dsinfer_decoder"))

    class GaveUp:
        def fits(self, x):
            return False

        def check(self):
            raise RuntimeError(status_failure([1, 0, 1, 6, 5], 0))

    dec.tp.fast = GaveUp()
    with pytest.raises(RuntimeError, match="gave up waiting for rank 1"):
        model(**hf_models.inputs(ref))
