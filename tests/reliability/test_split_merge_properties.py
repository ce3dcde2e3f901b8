"""Issue 6.5 (properties): for random geometries of the real architectures (specs.plan of GPT-2,
GPT-Neo, GPT-J, GPT-NeoX, OPT, BLOOM, Llama GQA, BERT, T5) and random TP degrees, splitting
and merging is the identity, re-splitting to another TP equals splitting the original, and the
files dsinfer writes read back bit-exactly. int8 weights (random group counts) split with their
scales: each rank's dequantized slice is the slice of the dequantized weight, or the plan
refuses with an error naming the tensor. (The quantizer's own error bound: tests/kernels.)"""
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dsinfer import specs
from dsinfer.formats import Checkpoint, CheckpointError, TensorRef, dsinfer_format
from dsinfer.formats.layout import shard, unshard
from dsinfer.kernels import dequantize_ref
from dsinfer.quantize import QuantConfig, quantized_view
from dsinfer.reshard import Target, write
from helpers import hf_models

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _config(arch: str, heads: int, kv: int, hd: int, ffn: int, vocab: int):
    """HF config of `arch` with this geometry (2 layers)."""
    hidden = heads * hd
    keys = {  # arch -> overrides of hf_models.CONFIGS
        "gpt2": dict(n_embd=hidden, n_head=heads, n_inner=ffn),
        "gpt_neo": dict(hidden_size=hidden, num_heads=heads, intermediate_size=ffn),
        "gptj": dict(n_embd=hidden, n_head=heads, n_inner=ffn, rotary_dim=hd),
        "gpt_neox": dict(hidden_size=hidden, num_attention_heads=heads, intermediate_size=ffn),
        "opt": dict(hidden_size=hidden, num_attention_heads=heads, ffn_dim=ffn,
                    word_embed_proj_dim=hidden),
        "bloom": dict(hidden_size=hidden, n_head=heads),
        "llama": dict(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
                      intermediate_size=ffn, head_dim=hd),
        "bert": dict(hidden_size=hidden, num_attention_heads=heads, intermediate_size=ffn),
        "t5": dict(d_model=hidden, d_kv=hd, d_ff=ffn, num_heads=heads),
    }[arch]
    cls, base, model_cls = hf_models.CONFIGS[arch]
    return cls(**{**base, **keys, "vocab_size": vocab}), model_cls


ARCHS = ["gpt2", "gpt_neo", "gptj", "gpt_neox", "opt", "bloom", "llama", "bert", "t5"]


@st.composite
def geometries(draw, arch):
    tp = draw(st.sampled_from([1, 2, 3, 4]))
    kv = tp * draw(st.integers(1, 2))
    heads = kv * (draw(st.integers(1, 2)) if arch == "llama" else 1)
    hd = draw(st.sampled_from([2, 4]))
    ffn = tp * draw(st.integers(1, 6))
    vocab = draw(st.integers(8, 40))      # often not divisible: the plan replicates it then
    return arch, tp, heads, kv, hd, ffn, vocab, draw(st.integers(0, 2 ** 16))


def _checkpoint(case):
    arch, tp, heads, kv, hd, ffn, vocab, seed = case
    config, model_cls = _config(arch, heads, kv, hd, ffn, vocab)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in model_cls(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    full = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    refs = [TensorRef(n, s, torch.float32, load=lambda t=full[n]: t) for n, s in shapes.items()]
    cfg = config.to_dict()
    cfg["architectures"] = [model_cls.__name__]
    return Checkpoint("test", cfg, refs), full, specs.for_config(cfg), tp


@pytest.mark.parametrize("arch", ARCHS)
@settings(max_examples=10, **SETTINGS)
@given(data=st.data())
def test_split_merge_identity_on_real_plans(arch, data):
    case, tp2 = data.draw(geometries(arch)), data.draw(st.sampled_from([1, 2, 3, 4]))
    ckpt, full, spec, tp = _checkpoint(case)
    placements, styles = specs.plan(spec, ckpt.config, ckpt.tensors, tp)
    assert set(placements) == set(full)
    assert {"colwise", "rowwise"} & set(styles.values()) or tp == 1
    try:
        placements2, _ = specs.plan(spec, ckpt.config, ckpt.tensors, tp2)
    except CheckpointError as e:        # only for heads that do not divide by tp2
        assert "do not divide by TP" in str(e) or "does not split" in str(e), e
        placements2 = None
    for name, t in full.items():
        p = placements[name]
        pieces = [shard(t, p, tp, r) for r in range(tp)]
        assert all(x.shape == p.shard_shape(t.shape, tp) for x in pieces), name
        merged = unshard(pieces, p)
        assert torch.equal(merged, t), name
        if placements2 is not None:      # TP tp -> merge -> TP tp2 == TP tp2 directly
            p2 = placements2[name]
            assert all(torch.equal(shard(merged, p2, tp2, r), shard(t, p2, tp2, r))
                       for r in range(tp2)), name


@pytest.mark.parametrize("arch", ARCHS)
@settings(max_examples=2, **SETTINGS)
@given(data=st.data())
def test_written_files_read_back_exactly(tmp_path_factory, arch, data):
    case = data.draw(geometries(arch))
    ckpt, full, spec, tp = _checkpoint(case)
    out = tmp_path_factory.mktemp("prop") / "out"
    write(ckpt, spec, Target(out, tp, progress=False), src=out.parent / "src")
    assert dsinfer_format.verify(out) == []
    back = {t.name: t.load() for t in dsinfer_format.read(out).tensors}
    assert back.keys() == full.keys()
    assert all(torch.equal(back[n], t) for n, t in full.items())


@pytest.mark.parametrize("arch", ARCHS)
@settings(max_examples=5, **SETTINGS)
@given(data=st.data())
def test_int8_scales_follow_their_weights(arch, data):
    case = data.draw(geometries(arch))
    ckpt, full, spec, tp = _checkpoint(case)
    groups = data.draw(st.one_of(st.just("per-channel"), st.sampled_from([tp, 2 * tp]),
                                 st.integers(1, 8)))
    try:
        qckpt, extra = quantized_view(ckpt, spec, QuantConfig(groups=groups), {})
        placements, _ = specs.plan(spec, qckpt.config, qckpt.tensors, tp)
    except CheckpointError as e:      # too few rows, or groups a TP split would cut
        assert "tensor '" in str(e), e
        event("int8: refused with an error naming the tensor")
        return
    event(f"int8: {len(extra)} weights checked at TP {tp}")
    refs = qckpt.by_name()
    for name in extra:
        rule = spec.rule_for(name)
        q, s = refs[name].load(), refs[name + specs.SCALE_SUFFIX].load()
        as_rows = (lambda x: x.t()) if rule.transposed else (lambda x: x)   # -> [out, in]
        whole = as_rows(dequantize_ref(as_rows(q), s))
        pw, ps = placements[name], placements[name + specs.SCALE_SUFFIX]
        for r in range(tp):
            mine = as_rows(dequantize_ref(as_rows(shard(q, pw, tp, r)), shard(s, ps, tp, r)))
            assert torch.equal(mine, shard(whole, pw, tp, r)), (name, r)
