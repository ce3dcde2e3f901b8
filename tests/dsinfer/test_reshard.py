"""HF -> TP4 -> TP2 -> HF round trips for every architecture, and TP=2 logits through
plain HF modules (tests/helpers/tp_sim.py)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from dsinfer import specs
from dsinfer.formats import dsinfer_format
from dsinfer.reshard import reshard
from helpers import hf_models, tp_sim


def _hf_tensors(folder):
    files = sorted(folder.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def _assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("arch", list(hf_models.CONFIGS))
def test_round_trip_tp4_tp2_hf(arch, tmp_path):
    src = hf_models.save(hf_models.build(arch), tmp_path / "hf")
    reshard(src, tmp_path / "tp4", tp=4, progress=False)
    reshard(tmp_path / "tp4", tmp_path / "tp2", tp=2, progress=False)
    reshard(tmp_path / "tp2", tmp_path / "back", tp=1, to="hf", progress=False)
    _assert_identical(_hf_tensors(src), _hf_tensors(tmp_path / "back"))
    assert dsinfer_format.verify(tmp_path / "tp2") == []
    m = json.loads((tmp_path / "tp4" / "dsinfer.json").read_text())
    assert m["tp_size"] == 4 and m["source"]["format"] == "hf"
    assert any(t["split_dim"] is not None for t in m["tensors"].values())
    # every rank file holds only 1/4 of each split tensor
    r0 = dsinfer_format.read_rank(tmp_path / "tp4", 0)
    for name, info in m["tensors"].items():
        if info["split_dim"] is not None:
            assert r0[name].shape[info["split_dim"]] * 4 == info["shape"][info["split_dim"]]


@pytest.mark.parametrize("arch", hf_models.CAUSAL + ["bert", "t5"])
def test_tp2_logits_match_original(arch, tmp_path):
    model = hf_models.build(arch)
    src = hf_models.save(model, tmp_path / "hf")
    reshard(src, tmp_path / "tp2", tp=2, progress=False)
    tp_model = tp_sim.load_tp_model(tmp_path / "tp2", type(model))
    x = hf_models.inputs(model)
    with torch.no_grad():
        want, got = model(**x).logits, tp_model(**x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_packed_qkv_gives_each_rank_whole_heads(tmp_path):
    model = hf_models.build("gpt2")
    src = hf_models.save(model, tmp_path / "hf")
    reshard(src, tmp_path / "tp2", tp=2, progress=False)
    w = model.transformer.h[0].attn.c_attn.weight.detach()   # Conv1D [in, 3*hidden]
    q, k, v = w.split(64, dim=1)
    r1 = dsinfer_format.read_rank(tmp_path / "tp2", 1)["transformer.h.0.attn.c_attn.weight"]
    assert torch.equal(r1, torch.cat([q[:, 32:], k[:, 32:], v[:, 32:]], dim=1))


@pytest.mark.parametrize("layout", ["bin", "sharded_safetensors", "sharded_bin"])
def test_hf_source_layouts(layout, tmp_path):
    model = hf_models.build("llama")
    kwargs = {"bin": dict(safe_serialization=False),
              "sharded_safetensors": dict(max_shard_size="50KB"),
              "sharded_bin": dict(safe_serialization=False, max_shard_size="50KB")}[layout]
    try:
        src = hf_models.save(model, tmp_path / "hf", **kwargs)
    except TypeError:
        pytest.skip("this transformers cannot write that layout")
    reshard(src, tmp_path / "tp2", tp=2, progress=False)
    reshard(tmp_path / "tp2", tmp_path / "back", tp=1, to="hf", progress=False)
    want = {k: v.detach() for k, v in model.state_dict().items()}
    got = _hf_tensors(tmp_path / "back")
    _assert_identical({k: want[k] for k in got}, got)


def test_dtype_cast_and_vocab_not_divisible_is_replicated(tmp_path):
    model = hf_models.build("llama", vocab_size=130)
    src = hf_models.save(model, tmp_path / "hf")
    reshard(src, tmp_path / "tp4", tp=4, dtype="bfloat16", progress=False)
    m = json.loads((tmp_path / "tp4" / "dsinfer.json").read_text())
    assert m["dtype"] == "bfloat16"
    assert m["tensors"]["model.embed_tokens.weight"]["split_dim"] is None
    got = dsinfer_format.read(tmp_path / "tp4").by_name()["model.layers.0.mlp.up_proj.weight"].load()
    assert torch.equal(got, model.model.layers[0].mlp.up_proj.weight.detach().bfloat16())


def test_split_into_parts(tmp_path):
    src = hf_models.save(hf_models.build("gpt2"), tmp_path / "hf")
    reshard(src, tmp_path / "tp2", tp=2, progress=False, max_part_bytes=40_000)
    parts = sorted((tmp_path / "tp2" / "rank-00-of-02").glob("part-*.safetensors"))
    assert len(parts) > 1
    reshard(tmp_path / "tp2", tmp_path / "back", tp=1, to="hf", progress=False)
    _assert_identical(_hf_tensors(src), _hf_tensors(tmp_path / "back"))


def test_every_spec_has_a_test_model():
    covered = {specs.for_config({"model_type": hf_models.CONFIGS[a][0].model_type}).name
               for a in hf_models.CONFIGS}
    assert covered == {s.name for s in specs.SPECS}


class _T:
    def __init__(self, name, shape):
        self.name, self.shape = name, tuple(shape)


def _layers(n, extra=(), shape=(8, 4), prefix="model.layers"):
    return [_T(f"{prefix}.{i}.{p}.weight", shape) for i in range(n)
            for p in ("self_attn.q_proj", "mlp.down_proj")] + [_T(n_, s) for n_, s in extra]


@pytest.mark.parametrize("tensors,config,needles", [
    (_layers(3)[:-1], {}, ("model.layers.2.mlp.down_proj.weight", "is missing", "layer 0 has")),
    (_layers(3) + [_T("model.layers.1.mlp.extra.weight", (2,))], {},
     ("model.layers.0.mlp.extra.weight", "is missing")),
    ([t for t in _layers(4) if ".2." not in t.name], {}, ("model.layers.2 has no tensors",)),
    (_layers(3)[:2] + [_T("model.layers.1.self_attn.q_proj.weight", (9, 4))] + _layers(3)[3:],
     {}, ("'model.layers.1.self_attn.q_proj.weight' is [9, 4]", "[8, 4]", "1 more layers")),
    (_layers(2), {"num_hidden_layers": 3}, ("config declares 3 layers", "holds 2")),
])
def test_check_layers_refuses(tensors, config, needles):
    """Incomplete or mixed layer stacks are refused before anything is written, with the
    tensor or layer named."""
    with pytest.raises(specs.CheckpointError) as e:
        specs.check_layers(specs.get("llama"), tensors, config, "src")
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_check_layers_accepts():
    """Whole stacks; T5's first-block relative_attention_bias and two stacks (no layer count
    check); int8 scales on some layers only (dsinfer-quantize --skip)."""
    llama = specs.get("llama")
    specs.check_layers(llama, _layers(3), {"num_hidden_layers": 3}, "src")
    specs.check_layers(llama, _layers(3) + [_T("model.layers.1.mlp.down_proj.weight_scale",
                                                (8, 1))], {}, "src")
    t5 = (_layers(2, prefix="encoder.block") + _layers(3, prefix="decoder.block")
          + [_T("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (32, 4))])
    specs.check_layers(specs.get("t5"), t5, {"num_layers": 2}, "src")
