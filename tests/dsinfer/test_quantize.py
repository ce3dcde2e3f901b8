"""dsinfer-quantize: effective group counts per architecture, bit-exact across TP degrees and
reshards, the manifest block, and its bad inputs."""
import json

import pytest
import torch

from dsinfer import specs
from dsinfer.formats import CheckpointError, dsinfer_format
from dsinfer.kernels import dequantize_ref
from dsinfer.quantize import QuantConfig, dequantized_state_dict, quantize
from dsinfer.reshard import reshard
from helpers import hf_models


def _manifest(path):
    return json.loads((path / "dsinfer.json").read_text())


def _same_ranks(a, b, tp):
    for r in range(tp):
        x, y = dsinfer_format.read_rank(a, r), dsinfer_format.read_rank(b, r)
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (r, k)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    return {a: hf_models.save(hf_models.build(a), root / a) for a in hf_models.CONFIGS}


def _smallest_divisor_at_least(rows, asked):
    return next(d for d in range(asked, rows + 1) if rows % d == 0)


@pytest.mark.parametrize("arch", list(hf_models.CONFIGS))
def test_group_counts_follow_options(arch, sources, tmp_path):
    qc = QuantConfig(groups=3, mlp_extra_grouping=True)
    _, report = quantize(sources[arch], tmp_path / "q", qc, progress=False)
    m = _manifest(tmp_path / "q")
    spec = specs.get(m["architecture"])
    assert m["quantization"]["method"] == "int8-moq" and m["quantization"]["quantized"]
    for name in m["quantization"]["quantized"]:
        rule = spec.rule_for(name)
        assert rule.role in ("attn", "mlp")
        rows = m["tensors"][name]["shape"][1 if rule.transposed else 0]
        want = _smallest_divisor_at_least(rows, 6 if rule.role == "mlp" else 3)
        assert m["tensors"][name]["quant"]["groups"] == want == report["tensors"][name]["groups"]
        assert m["tensors"][name + "_scale"]["shape"] == [want, 1]
        assert m["tensors"][name]["dtype"] == "int8"
    # norms, biases and embeddings stay in float
    assert all(i["dtype"] != "int8" for n, i in m["tensors"].items()
               if n not in m["quantization"]["quantized"])


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bloom", "t5", "opt"])
@pytest.mark.parametrize("groups", ["per-channel", 24])
def test_quantize_then_reshard_equals_quantize_at_tp(arch, groups, sources, tmp_path):
    qc = QuantConfig(groups=groups, group_size=16 if groups == 24 else None)
    quantize(sources[arch], tmp_path / "q1", qc, tp=1, progress=False)
    for tp in (2, 4):
        quantize(sources[arch], tmp_path / f"direct{tp}", qc, tp=tp, progress=False)
        reshard(tmp_path / "q1", tmp_path / f"via{tp}", tp=tp, progress=False)
        _same_ranks(tmp_path / f"direct{tp}", tmp_path / f"via{tp}", tp)
    reshard(tmp_path / "via4", tmp_path / "back1", tp=1, progress=False)
    _same_ranks(tmp_path / "q1", tmp_path / "back1", 1)
    assert _manifest(tmp_path / "via4")["quantization"] == _manifest(tmp_path / "q1")["quantization"]


def test_dequantized_weights_are_close_and_scales_keep_dtype(sources, tmp_path):
    model = hf_models.build("llama")
    quantize(sources["llama"], tmp_path / "q", QuantConfig(groups="per-channel"), tp=2,
             dtype="float16", progress=False)
    m = _manifest(tmp_path / "q")
    assert m["tensors"]["model.layers.0.mlp.up_proj.weight_scale"]["dtype"] == "float32"
    assert m["tensors"]["model.norm.weight"]["dtype"] == "float16"
    sd = dequantized_state_dict(tmp_path / "q")
    w = model.model.layers[0].mlp.up_proj.weight.detach()
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((sd["model.layers.0.mlp.up_proj.weight"] - w.half().float()).abs() <= step / 2 + 1e-3).all()


def test_transposed_conv1d_groups_are_output_rows(sources, tmp_path):
    quantize(sources["gpt2"], tmp_path / "q", QuantConfig(groups="per-channel"), progress=False)
    sd = dsinfer_format.read_rank(tmp_path / "q", 0)
    q, s = sd["transformer.h.0.mlp.c_fc.weight"], sd["transformer.h.0.mlp.c_fc.weight_scale"]
    assert q.shape == (64, 256) and s.shape == (256, 1)  # Conv1D [in, out]: 256 output rows
    model = hf_models.build("gpt2")
    w = model.transformer.h[0].mlp.c_fc.weight.detach()
    assert torch.allclose(dequantize_ref(q.t(), s).t(), w, atol=w.abs().max().item() / 254 + 1e-6)


@pytest.mark.parametrize("case,needle", [
    ("tp_cuts_groups", "row groups would be cut"),
    ("group_size", "does not divide"),
    ("already_int8", "already quantized"),
    ("too_many_groups", "fewer than the"),
    ("bad_groups", "--groups"),
])
def test_bad_inputs(case, needle, sources, tmp_path):
    src, qc, tp = sources["gpt2"], None, 1
    if case == "tp_cuts_groups":
        qc, tp = QuantConfig(groups=4), 2     # c_attn: 4 groups of 48 rows vs parts of 64
    elif case == "group_size":
        qc = QuantConfig(groups=1, group_size=7)
    elif case == "already_int8":
        quantize(src, tmp_path / "q", QuantConfig(groups=2), progress=False)
        src, qc = tmp_path / "q", QuantConfig(groups=2)
    elif case == "too_many_groups":
        qc = QuantConfig(groups=1000)
    with pytest.raises(CheckpointError, match=needle):
        quantize(src, tmp_path / "out", qc or QuantConfig(groups=0), tp=tp, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_summary_and_report(sources, tmp_path, capsys):
    from dsinfer.tools import quantize as cli
    code = cli.main([str(sources["llama"]), "--out", str(tmp_path / "q"), "--groups", "8",
                     "--mlp-extra-grouping", "--tp", "2", "--report", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0 and "quantized" in out and "SQNR" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"]["tensors"] == len(report["tensors"]) == 14
    code = cli.main([str(sources["llama"]), "--out", str(tmp_path / "q2"), "--groups", "8",
                     "--report", str(tmp_path / "r.json")])
    assert code == 1 and "already exists" in capsys.readouterr().err
