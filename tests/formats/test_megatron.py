"""Megatron-LM reader: real megatron-core fixtures against their oracle logits, and round trips
HF -> Megatron (test-side writer, every layout) -> reader == the HF model, bit for bit."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from dsinfer.formats import CheckpointError, ReadOptions, megatron
from dsinfer.formats.safe_pickle import load_pt
from helpers import hf_models
from helpers.checkpoints import hf_model, logits
from helpers.checkpoints import load_tensors as tensors
from helpers.megatron_writer import write_megatron

MEGATRON = FIXTURES / "megatron"
ITER = "iter_0000001"


# ---- helpers --------------------------------------------------------------------------------

# ---- real megatron-core checkpoints ---------------------------------------------------------

# fixture -> (folder whose oracle applies, logits key)
ORACLES = {
    "gpt2_tp1": ("gpt2_tp1", "logits"),
    "gpt2_tp2": ("gpt2_tp2", "logits"),
    "gpt2_tp1_pp2": ("gpt2_tp1_pp2", "logits"),
    "llama_tp1": ("llama_tp1", "logits"),
    "llama_tp2": ("llama_tp2", "logits"),
    "llama_tp2_pp2": ("llama_tp2_pp2", "logits"),
    "llama_bf16_tp2": ("llama_bf16_tp2", "logits_fp32_upcast"),
    "llama_tp2_with_rng": ("llama_tp2", "logits"),
}
# fixture -> the TP=1 fixture holding the same model, bit for bit
SAME_AS = {"gpt2_tp2": "gpt2_tp1", "gpt2_tp1_pp2": "gpt2_tp1", "llama_tp2": "llama_tp1",
           "llama_tp2_pp2": "llama_tp1", "llama_tp2_with_rng": "llama_tp1"}


@pytest.fixture(scope="module")
def read_fixture():
    cache = {}

    def read(name):
        if name not in cache:
            ckpt = megatron.read(MEGATRON / name, ReadOptions())
            cache[name] = (ckpt, tensors(ckpt))
        return cache[name]
    return read


@pytest.mark.parametrize("name", sorted(ORACLES))
def test_fixture_matches_oracle(name, read_fixture):
    ckpt, state = read_fixture(name)
    oracle_dir, key = ORACLES[name]
    oracle = load_file(MEGATRON / oracle_dir / "oracle.safetensors")
    model = hf_model(ckpt.config, state)
    got, want = logits(model, oracle["input_ids"]), oracle[key]
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    meta = json.loads((MEGATRON / name / "model_meta.json").read_text()) \
        if (MEGATRON / name / "model_meta.json").is_file() else {}
    assert ckpt.format == "megatron" and ckpt.extra_files == {}
    assert ckpt.source == {"format": "megatron",
                           "tp_size": meta.get("tensor_model_parallel_size", 2),
                           "pp_size": meta.get("pipeline_model_parallel_size", 1),
                           "checkpoint_version": 3.0, "iteration": 1}


def test_fixture_configs():
    gpt2 = megatron.read(MEGATRON / "gpt2_tp2", ReadOptions()).config
    assert gpt2["architectures"] == ["GPT2LMHeadModel"]
    assert gpt2["activation_function"] == "gelu_new"  # megatron's fused bias_gelu is tanh
    assert gpt2["vocab_size"] == 128 and gpt2["tie_word_embeddings"] is True
    llama = megatron.read(MEGATRON / "llama_bf16_tp2", ReadOptions()).config
    assert llama["architectures"] == ["LlamaForCausalLM"] and llama["torch_dtype"] == "bfloat16"
    assert (llama["num_key_value_heads"], llama["head_dim"], llama["intermediate_size"]) \
        == (2, 8, 176)


@pytest.mark.parametrize("name", sorted(SAME_AS))
def test_fixture_merges_equal_tp1(name, read_fixture):
    ckpt, state = read_fixture(name)
    ref_ckpt, ref = read_fixture(SAME_AS[name])
    assert ckpt.config == ref_ckpt.config
    assert list(state) == list(ref) and all(torch.equal(state[n], ref[n]) for n in ref)


def test_fixture_bf16_is_bf16_of_fp32(read_fixture):
    _, bf16 = read_fixture("llama_bf16_tp2")
    _, fp32 = read_fixture("llama_tp1")
    assert all(bf16[n].dtype == torch.bfloat16 and torch.equal(bf16[n], fp32[n].bfloat16())
               for n in fp32)


@pytest.mark.parametrize("name,stages", [("gpt2_tp2", None), ("llama_tp2", None),
                                         ("gpt2_tp1_pp2", [1, 1]), ("llama_tp2_pp2", [2, 1])])
def test_writer_reproduces_megatron_files(name, stages, tmp_path, read_fixture):
    """The test-side writer, fed the HF tensors of a fixture, writes the fixture's own tensors."""
    ckpt, state = read_fixture(name)
    src = ckpt.source
    write_megatron(tmp_path, state, ckpt.config, tp=src["tp_size"], pp=src["pp_size"],
                   stage_layers=stages, version=3.0, names="mcore")
    folders = sorted((MEGATRON / name / ITER).iterdir())
    assert [f.name for f in folders] == sorted(p.name for p in (tmp_path / ITER).iterdir())
    for folder in folders:
        want = load_pt(folder / "model_optim_rng.pt")["model"]
        got = load_pt(tmp_path / ITER / folder.name / "model_optim_rng.pt")["model"]
        assert set(got) == set(want), folder.name
        for n, t in want.items():
            assert (got[n] is None and t is None) or torch.equal(got[n], t), (folder.name, n)


# ---- round trips through the test-side writer -----------------------------------------------

VOCAB = 100  # tokenizer vocab; the writer pads it to a multiple of 64 * TP
MODELS = {
    "gpt2": ("gpt2", dict(n_head=4, vocab_size=VOCAB, n_positions=32)),
    # 2 heads per rank at TP 4 (with 4 heads, one head per rank makes v0 == v2.0)
    "gpt2_8h": ("gpt2", dict(n_head=8, vocab_size=VOCAB, n_positions=32)),
    "gpt2_untied": ("gpt2", dict(n_head=4, vocab_size=VOCAB, n_positions=32,
                                 tie_word_embeddings=False)),
    "gpt2_erf": ("gpt2", dict(n_head=4, vocab_size=VOCAB, n_positions=32,
                              activation_function="gelu")),
    "llama_kv2": ("llama", dict(vocab_size=VOCAB, num_hidden_layers=3, intermediate_size=96,
                                num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=5000.0)),
    "llama_kv4": ("llama", dict(vocab_size=VOCAB, num_hidden_layers=3, intermediate_size=96,
                                num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=5000.0)),
    "llama_mha": ("llama", dict(vocab_size=VOCAB, num_hidden_layers=2, intermediate_size=96,
                                num_key_value_heads=8)),
    "llama_bias": ("llama", dict(vocab_size=VOCAB, num_hidden_layers=2, intermediate_size=96,
                                 num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    # --add-qkv-bias --disable-bias-linear: Qwen2
    "qwen2": ("qwen2", dict(vocab_size=VOCAB, num_hidden_layers=2, intermediate_size=96,
                            num_key_value_heads=2)),
}


@pytest.fixture(scope="module")
def source_model():
    cache = {}

    def get(key):
        if key not in cache:
            arch, overrides = MODELS[key]
            model = hf_models.build(arch, seed=len(cache), **overrides)
            state = {n: p.detach().clone() for n, p in model.named_parameters()}
            cache[key] = (model, state, model.config.to_dict())
        return cache[key]
    return get


def case(model, tp, version=3.0, names="new", tag=1, **kw):
    return pytest.param(model, dict(tp=tp, version=version, names=names, tag=tag, **kw),
                        id=f"{model}-tp{tp}-pp{kw.get('pp', 1)}-v{version}-{names}-{tag}"
                           + "".join(f"-{k}" for k in kw if k not in ("pp", "stage_layers")))


CASES = [
    *(case("gpt2", tp, v, n, "release" if tp == 2 else 1000)
      for v in (0, 1.0, 2.0, 3.0) for n in ("new", "old") for tp in (2, 4)),
    *(case("gpt2_8h", 4, v, "new") for v in (0, 1.0, 2.0)),
    case("gpt2", 2, 3.0, "mcore", 7),
    case("gpt2", 4, 3.0, "mcore", "release"),
    case("gpt2", 2, 3.0, "new", pp=2),                     # word_embeddings_for_head on stage 1
    case("gpt2", 2, 3.0, "mcore", pp=2),                   # output_layer copy on stage 1
    case("gpt2", 1, 0, "old", 20, file_name="model_rng.pt", zip_format=False),
    case("gpt2_untied", 2, 2.0, "new"),
    case("gpt2_erf", 2, 3.0, "mcore"),
    *(case("llama_kv2", 2, v, n) for v in (2.0, 3.0) for n in ("new", "mcore")),
    case("llama_kv4", 4, 3.0, "mcore", "release"),
    case("llama_kv4", 4, 2.0, "new", 300),
    case("llama_kv2", 2, 3.0, "mcore", pp=2, stage_layers=[2, 1]),
    case("llama_kv2", 2, 3.0, "new", pp=3),
    case("llama_mha", 4, 2.0, "new"),
    case("llama_bias", 2, 3.0, "mcore"),
    case("qwen2", 2, 3.0, "mcore"),
    case("qwen2", 2, 3.0, "new", pp=2),
]


@pytest.mark.parametrize("model_key,layout", CASES)
def test_round_trip(model_key, layout, tmp_path, source_model):
    model, want, config = source_model(model_key)
    write_megatron(tmp_path, want, config, **layout)
    assert megatron.sniff(tmp_path)
    ckpt = megatron.read(tmp_path, ReadOptions(vocab_size=VOCAB))
    got = tensors(ckpt)
    assert list(sorted(got)) == sorted(want)
    for n, t in want.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n
    assert ckpt.source == {"format": "megatron", "tp_size": layout["tp"],
                           "pp_size": layout.get("pp", 1),
                           "checkpoint_version": float(layout["version"]),
                           "iteration": layout["tag"]}
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(hf_model(ckpt.config, got), ids), logits(model, ids),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_key", ["gpt2", "llama_kv2"])
def test_vocab_padding_kept_by_default(model_key, tmp_path, source_model):
    _, want, config = source_model(model_key)
    write_megatron(tmp_path, want, config, tp=2, names="mcore")
    ckpt = megatron.read(tmp_path / ITER, ReadOptions())  # an iter folder works too
    assert ckpt.config["vocab_size"] == 128
    got = {r.name: r for r in ckpt.tensors}
    for n in ("transformer.wte.weight", "model.embed_tokens.weight", "lm_head.weight"):
        if n in want:
            assert got[n].shape == (128, 64)
            assert torch.equal(got[n].load()[:VOCAB], want[n])


def _rewrite(path: Path, edit):
    state = load_pt(path)
    state["model"] = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                      for k, v in state["model"].items()}
    edit(state)
    torch.save(state, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


# other spellings of the same tensors: TransformerEngine fused norms, legacy `*_norm` names
RENAMES = {
    "te_fused": ("mcore", {".input_layernorm.weight":
                           ".self_attention.linear_qkv.layer_norm_weight",
                           ".pre_mlp_layernorm.weight": ".mlp.linear_fc1.layer_norm_weight"}),
    "norm_names": ("flat_legacy", {".input_layernorm.": ".input_norm.",
                                   ".post_attention_layernorm.": ".post_attention_norm.",
                                   ".final_layernorm.": ".final_norm."}),
}


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


@pytest.mark.parametrize("variant", sorted(RENAMES))
def test_alternative_names(variant, tmp_path, source_model):
    """TE-fused norm names, `*_norm` legacy names, and a legacy `model` stored flat."""
    _, want, config = source_model("llama_kv2")
    names, renames = RENAMES[variant]
    write_megatron(tmp_path, want, config, tp=2, names="mcore" if names == "mcore" else "new")

    def edit(state):
        flat = dict(_flat(state["model"]))
        for old, new in renames.items():
            flat = {k.replace(old, new): v for k, v in flat.items()}
        state["model"] = flat
    for r in range(2):
        _rewrite(tmp_path / ITER / f"mp_rank_{r:02d}" / "model_optim_rng.pt", edit)
    got = tensors(megatron.read(tmp_path, ReadOptions(vocab_size=VOCAB)))
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_mappings_are_dropped_and_reopened(tmp_path, source_model, monkeypatch):
    _, want, config = source_model("gpt2")
    write_megatron(tmp_path, want, config, tp=2)
    monkeypatch.setattr(megatron, "RELEASE_BYTES", 1)
    got = tensors(megatron.read(tmp_path, ReadOptions(vocab_size=VOCAB)))
    assert all(torch.equal(got[n], want[n]) for n in want)


# ---- descriptor (DeepSpeed tutorial checkpoint.json) ----------------------------------------

def _desc(version, n=2):
    return {"type": "Megatron", "version": version,
            "checkpoints": [f"{ITER}/mp_rank_{r:02d}/model_optim_rng.pt" for r in range(n)]}


def test_descriptor_version_applies_when_files_lack_it(tmp_path, source_model):
    _, want, config = source_model("gpt2")
    write_megatron(tmp_path, want, config, tp=2, version=1.0, stored_version=None)
    ckpt = megatron.read_descriptor(_desc(1.0), tmp_path, ReadOptions(vocab_size=VOCAB))
    got = tensors(ckpt)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert ckpt.source["checkpoint_version"] == 1.0 and ckpt.source["tp_size"] == 2
    wrong = tensors(megatron.read_descriptor(_desc(0.0), tmp_path, ReadOptions()))
    assert not torch.equal(wrong["transformer.h.0.attn.c_attn.weight"],
                           want["transformer.h.0.attn.c_attn.weight"])


def test_descriptor_files_version_wins(tmp_path, source_model):
    _, want, config = source_model("gpt2")
    write_megatron(tmp_path, want, config, tp=2, version=2.0)
    got = tensors(megatron.read_descriptor(_desc(0.0), tmp_path,
                                           ReadOptions(vocab_size=VOCAB)))
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_descriptor_errors(tmp_path, source_model):
    _, want, config = source_model("gpt2")
    write_megatron(tmp_path, want, config, tp=2)
    desc = _desc(3.0, n=3)
    with pytest.raises(CheckpointError, match="mp_rank_02"):
        megatron.read_descriptor(desc, tmp_path, ReadOptions())
    with pytest.raises(CheckpointError, match="TP 2"):
        megatron.read_descriptor(_desc(3.0, n=1), tmp_path, ReadOptions())


# ---- architecture override -------------------------------------------------------------------

def test_arch_override():
    ckpt = megatron.read(MEGATRON / "gpt2_tp1", ReadOptions(arch="GPT2LMHeadModel"))
    assert ckpt.architecture == "GPT2LMHeadModel"
    with pytest.raises(CheckpointError, match="LlamaForCausalLM"):
        megatron.read(MEGATRON / "gpt2_tp1", ReadOptions(arch="llama"))
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel"):
        megatron.read(MEGATRON / "llama_tp1", ReadOptions(arch="gpt2"))
    with pytest.raises(CheckpointError, match="known: gpt2"):
        megatron.read(MEGATRON / "llama_tp1", ReadOptions(arch="bert"))


# ---- detection -------------------------------------------------------------------------------

def test_sniff(tmp_path):
    assert megatron.sniff(MEGATRON / "llama_tp2_pp2")
    assert megatron.sniff(MEGATRON / "gpt2_tp2" / ITER)
    assert not megatron.sniff(MEGATRON / "gpt2_tp2" / ITER / "mp_rank_00" / "model_optim_rng.pt")
    assert not megatron.sniff(tmp_path)
    assert not megatron.sniff(FIXTURES / "deepspeed" / "ws1" / "gpt2_zero0")
    (tmp_path / "latest").write_text("global_step5")  # plain DeepSpeed: `latest` only
    (tmp_path / "global_step5").mkdir()
    assert not megatron.sniff(tmp_path)
    # Megatron-DeepSpeed writes both trackers (tests/formats/test_megatron_deepspeed.py)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("5")
    assert megatron.sniff(tmp_path)


# ---- bad input -------------------------------------------------------------------------------

@pytest.fixture
def gpt2_tp2(tmp_path, source_model):
    _, want, config = source_model("gpt2")
    return write_megatron(tmp_path / "ckpt", want, config, tp=2)


def _rank_file(root, r=0):
    return root / ITER / f"mp_rank_{r:02d}" / "model_optim_rng.pt"


def test_missing_rank_folder(gpt2_tp2):
    shutil.rmtree(gpt2_tp2 / ITER / "mp_rank_01")
    with pytest.raises(CheckpointError, match=r"mp_rank_01: missing; the args say TP 2"):
        megatron.read(gpt2_tp2, ReadOptions())


def test_rank_folder_without_model_file(gpt2_tp2):
    _rank_file(gpt2_tp2, 1).unlink()
    with pytest.raises(CheckpointError, match=r"mp_rank_01: no model_optim_rng.pt"):
        megatron.read(gpt2_tp2, ReadOptions())


def test_mixed_tp(gpt2_tp2, tmp_path, source_model):
    _, want, config = source_model("gpt2")
    tp4 = write_megatron(tmp_path / "tp4", want, config, tp=4)
    shutil.copy(_rank_file(tp4, 1), _rank_file(gpt2_tp2, 1))
    with pytest.raises(CheckpointError,
                       match=r"mp_rank_01/model_optim_rng.pt: tensor .* has shape"):
        megatron.read(gpt2_tp2, ReadOptions())


def test_unsupported_version(tmp_path, source_model):
    _, want, config = source_model("gpt2")
    write_megatron(tmp_path, want, config, tp=2, stored_version=4.0)
    with pytest.raises(CheckpointError, match=r"mp_rank_00/model_optim_rng.pt: checkpoint_version "
                                              r"4.0 is not supported"):
        megatron.read(tmp_path, ReadOptions())


def test_legacy_version_with_query_groups(tmp_path, source_model):
    _, want, config = source_model("llama_kv2")
    write_megatron(tmp_path, want, config, tp=2, version=1.0)
    with pytest.raises(CheckpointError, match="predates query groups"):
        megatron.read(tmp_path, ReadOptions())


@pytest.mark.parametrize("tag,match", [("6", r"iter_0000006: missing"),
                                       ("release", r"release: missing"),
                                       ("latest!", r"neither an iteration number")])
def test_bad_tracker(gpt2_tp2, tag, match):
    (gpt2_tp2 / "latest_checkpointed_iteration.txt").write_text(tag)
    with pytest.raises(CheckpointError, match=match):
        megatron.read(gpt2_tp2, ReadOptions())


def test_binary_tracker(gpt2_tp2):
    (gpt2_tp2 / "latest_checkpointed_iteration.txt").write_bytes(b"\xff\x00\x01")
    with pytest.raises(CheckpointError, match=r"latest_checkpointed_iteration.txt: not a tag "
                                              r"file .*write the iteration"):
        megatron.read(gpt2_tp2, ReadOptions())


def test_truncated_pickle(gpt2_tp2):
    path = _rank_file(gpt2_tp2, 1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"mp_rank_01/model_optim_rng.pt"):
        megatron.read(gpt2_tp2, ReadOptions())


def test_vocab_size_larger_than_padded(gpt2_tp2):
    with pytest.raises(CheckpointError, match="larger than the 128 embedding rows"):
        megatron.read(gpt2_tp2, ReadOptions(vocab_size=129))


def test_virtual_pipeline(gpt2_tp2):
    def edit(state):
        state["model0"] = state.pop("model")
        state["model1"] = {}
    for r in range(2):
        _rewrite(_rank_file(gpt2_tp2, r), edit)
    with pytest.raises(CheckpointError, match=r"mp_rank_00/model_optim_rng.pt: .*virtual pipeline"):
        megatron.read(gpt2_tp2, ReadOptions())


def test_unknown_tensor(gpt2_tp2):
    def edit(state):
        state["model"]["language_model"] = dict(state["model"]["language_model"])
        state["model"]["language_model"]["pooler"] = {"dense.weight": torch.zeros(2, 2)}
    for r in range(2):
        _rewrite(_rank_file(gpt2_tp2, r), edit)
    with pytest.raises(CheckpointError, match=r"'language_model.pooler.dense.weight' is not part"):
        megatron.read(gpt2_tp2, ReadOptions())


# every feature no HF family here can express, as its args field turns it on: one line naming it
UNSUPPORTED_ON = {
    "num_experts": 8, "multi_latent_attention": True, "qk_layernorm": True,
    "apply_layernorm_1p": True, "apply_residual_connection_post_layernorm": True,
    "squared_relu": True, "rotary_interleaved": True, "use_rope_scaling": True,
    "rotary_percent": None, "rotary_seq_len_interpolation_factor": 4, "window_size": (4095, 0),
    "attention_output_gate": True, "qk_l2_norm": True, "layernorm_zero_centered_gamma": True,
    "softmax_type": "learnable", "rope_type": "yarn", "mrope_section": [16, 24, 24],
    "no_rope_freq": 4, "mtp_num_layers": 1, "experimental_attention_variant": "dsa",
    "linear_attention_freq": 4, "glu_linear_offset": 1.0, "activation_func_clamp_value": 7.0,
    "quick_geglu": True, "glu_activation": "swiglu", "embed_layernorm": None,
}


def test_every_unsupported_feature_is_covered():
    assert {f for f, _, _ in megatron.UNSUPPORTED} == \
        {f for f, v in UNSUPPORTED_ON.items() if v is not None}


@pytest.mark.parametrize("field", [f for f, v in UNSUPPORTED_ON.items() if v is not None])
def test_unsupported_feature(field, gpt2_tp2):
    def edit(state):
        setattr(state["args"], field, UNSUPPORTED_ON[field])
    _rewrite(_rank_file(gpt2_tp2, 0), edit)
    with pytest.raises(CheckpointError, match=rf"mp_rank_00/model_optim_rng.pt: the model uses "
                                              rf".*\(args\.{field}="):
        megatron.read(gpt2_tp2, ReadOptions())


@pytest.mark.parametrize("field, value", [("window_size", None), ("window_size", (-1, -1)),
                                          ("softmax_type", "vanilla"), ("rope_type", "rope"),
                                          ("num_experts", [1]), ("glu_linear_offset", 0.0),
                                          ("no_rope_freq", 0), ("mtp_num_layers", None)])
def test_features_off_are_accepted(field, value, gpt2_tp2):
    def edit(state):
        setattr(state["args"], field, value)
    _rewrite(_rank_file(gpt2_tp2, 0), edit)
    megatron.read(gpt2_tp2, ReadOptions())


def test_partial_rope_does_not_fit_llama(tmp_path, source_model):
    """rotary_percent < 1 is GPT-NeoX's partial RoPE; Llama rotates whole heads."""
    _, want, config = source_model("llama_kv2")
    root = write_megatron(tmp_path / "ckpt", want, config, tp=1)

    def edit(state):
        state["args"].rotary_percent = 0.5
    _rewrite(root / ITER / "mp_rank_00" / "model_optim_rng.pt", edit)
    with pytest.raises(CheckpointError, match=r"rotary percent=0.5\) do not fit LlamaForCausalLM"):
        megatron.read(root, ReadOptions())
