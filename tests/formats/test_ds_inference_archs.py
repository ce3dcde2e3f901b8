"""DeepSpeed-Inference pre-sharded checkpoints of GPT-2, GPT-J, OPT, Llama and BERT, written by
DeepSpeed itself (tests/fixtures/ds_inference): the reader gives back the exact HF tensors.
TP 2 files are derived from them the way DeepSpeed slices (strided_copy: each rank holds its
slice of every fused part); a GQA Llama's unequal Q|K|V parts follow its config."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from dsinfer.formats import CheckpointError, detect, ds_inference, open_checkpoint
from dsinfer.formats.safe_pickle import load_pt

DSI = FIXTURES / "ds_inference"
ARCHS = ["gpt2", "gptj", "opt", "llama", "bert"]


def read(folder: Path) -> dict:
    return {r.name: r.load() for r in open_checkpoint(folder).tensors}


@pytest.mark.parametrize("arch", ARCHS)
def test_real_files_give_the_reference(arch):
    folder = DSI / arch / "presharded"
    assert detect(folder) == "ds_inference"
    got, want = read(folder), load_file(DSI / arch / "reference_fp16.safetensors")
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def _natives(folder: Path) -> dict:
    desc = json.loads((folder / ds_inference.CONFIG_NAME).read_text())
    out = {}
    for f in desc["checkpoints"]["non_tp"] + desc["checkpoints"]["tp"]:
        out.update(load_pt(folder / f))
    return out


def _slice(name: str, t: torch.Tensor, rule, config: dict, tp: int, r: int) -> torch.Tensor:
    """Rank r's piece of a TP 1 native tensor, as DeepSpeed cuts it."""
    if rule.split is None:
        return t
    sizes = rule.part_sizes(config, t.shape[rule.split], name)
    pieces, start = [], 0
    for n in sizes:                              # each fused part cut in tp, rank r's slice
        pieces.append(t.narrow(rule.split, start + r * n // tp, n // tp))
        start += n
    return torch.cat(pieces, rule.split).clone()


def write_tp(src: Path, dst: Path, tp: int, config: dict) -> Path:
    """src (TP 1, DeepSpeed's files) -> dst at `tp`, one tp file per rank."""
    arch = ds_inference.ARCHS[config["model_type"]]
    natives = _natives(src)
    dst.mkdir(parents=True)
    for r in range(tp):
        torch.save({n: _slice(n, t, ds_inference._native(n, arch, src)[1], config, tp, r)
                    for n, t in natives.items()}, dst / f"tp_{r:02d}_00.pt")
    torch.save({}, dst / "non-tp.pt")
    (dst / ds_inference.CONFIG_NAME).write_text(json.dumps(
        {"type": "ds_model", "base_dir": "", "version": 1.0, "parallelization": "tp",
         "tp_size": tp, "dtype": "float16",
         "checkpoints": {"non_tp": ["non-tp.pt"], "tp": [f"tp_{r:02d}_00.pt" for r in range(tp)]}}))
    shutil.copy(src.parent / "config.json", dst.parent / "config.json")
    return dst


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_files_give_the_reference(arch, tmp_path):
    config = json.loads((DSI / arch / "config.json").read_text())
    folder = write_tp(DSI / arch / "presharded", tmp_path / arch / "presharded", 2, config)
    got, want = read(folder), load_file(DSI / arch / "reference_fp16.safetensors")
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_tp2_qkv_holds_each_part_per_rank(tmp_path):
    """GPT-2's c_attn (one HF tensor, fused Q|K|V): rank 0 holds [Q_0 | K_0 | V_0]."""
    config = json.loads((DSI / "gpt2" / "config.json").read_text())
    folder = write_tp(DSI / "gpt2" / "presharded", tmp_path / "gpt2" / "presharded", 2, config)
    rank0 = load_pt(folder / "tp_00_00.pt")["transformer.h.0.attention.attn_qkvw"]
    c_attn = load_file(DSI / "gpt2" / "reference_fp16.safetensors")["transformer.h.0.attn.c_attn.weight"]
    q, k, v = c_attn.chunk(3, 1)
    assert torch.equal(rank0, torch.cat([q[:, :32], k[:, :32], v[:, :32]], 1))


def _gqa_llama(root: Path) -> dict:
    """A GQA Llama (4 query, 2 KV heads) in DeepSpeed's TP 1 layout, from the real MHA files'
    naming: attn_qkvw = cat(q, k, v).T, inter_w = cat(up, gate).T."""
    import transformers
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, vocab_size=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).half()
    sd = {n: p.detach().clone() for n, p in model.state_dict().items()}
    p = "model.layers.0."
    native = {"model.embed_tokens.weight": sd["model.embed_tokens.weight"],
              p + "norm_w": sd[p + "input_layernorm.weight"],
              p + "attention.attn_qkvw": torch.cat([sd[p + f"self_attn.{x}_proj.weight"]
                                                   for x in "qkv"]).t().contiguous(),
              p + "attention.attn_ow": sd[p + "self_attn.o_proj.weight"].t().contiguous(),
              p + "mlp.attn_nw": sd[p + "post_attention_layernorm.weight"],
              p + "mlp.inter_w": torch.cat([sd[p + "mlp.up_proj.weight"],
                                            sd[p + "mlp.gate_proj.weight"]]).t().contiguous(),
              p + "mlp.output_w": sd[p + "mlp.down_proj.weight"].t().contiguous(),
              "model.norm.weight": sd["model.norm.weight"], "lm_head.weight": sd["lm_head.weight"]}
    src = root / "tp1" / "presharded"
    src.mkdir(parents=True)
    torch.save(native, src / "tp_00_00.pt")
    torch.save({}, src / "non-tp.pt")
    (src / ds_inference.CONFIG_NAME).write_text(json.dumps(
        {"type": "ds_model", "version": 1.0, "parallelization": "tp", "tp_size": 1,
         "dtype": "float16", "checkpoints": {"non_tp": ["non-tp.pt"], "tp": ["tp_00_00.pt"]}}))
    cfg.save_pretrained(src.parent)
    return sd


def test_gqa_llama_splits_qkv_by_the_config(tmp_path):
    want = _gqa_llama(tmp_path)
    config = json.loads((tmp_path / "tp1" / "config.json").read_text())
    assert all(torch.equal(read(tmp_path / "tp1" / "presharded")[n], want[n]) for n in want)
    tp2 = write_tp(tmp_path / "tp1" / "presharded", tmp_path / "tp2" / "presharded", 2, config)
    got = read(tp2)
    assert got["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_config_that_does_not_fit_the_fused_parts(tmp_path):
    _gqa_llama(tmp_path)
    cfg = tmp_path / "tp1" / "config.json"
    cfg.write_text(json.dumps(dict(json.loads(cfg.read_text()), num_key_value_heads=3)))
    with pytest.raises(CheckpointError, match=r"attn_qkvw': 128 rows on dim 1 do not hold 3 "
                                              r"fused parts in the ratio \(4, 3, 3\)"):
        read(tmp_path / "tp1" / "presharded")


def test_int8_save_is_refused(tmp_path):
    folder = tmp_path / "opt" / "presharded"
    shutil.copytree(DSI / "opt", tmp_path / "opt")
    part = load_pt(folder / "tp_00_01.pt")
    name = next(n for n in part if n.endswith("attn_qkvw"))
    part[name] = [part[name].to(torch.int8), torch.ones(4)]
    torch.save(part, str(folder / "tp_00_01.pt") + ".tmp")
    (folder / "tp_00_01.pt.tmp").replace(folder / "tp_00_01.pt")
    with pytest.raises(CheckpointError, match=r"holds an int8 weight with its scales .*"
                                              r"dsinfer-quantize"):
        open_checkpoint(folder)


def test_bloom_typed_json_is_read_as_presharded(tmp_path):
    """DeepSpeed names its pre-sharded save of a BLOOM model "type": "bloom": the json path
    goes to this reader like a "ds_model" one."""
    shutil.copytree(DSI / "opt", tmp_path / "opt")
    cfg = tmp_path / "opt" / "presharded" / ds_inference.CONFIG_NAME
    cfg.write_text(json.dumps(dict(json.loads(cfg.read_text()), type="bloom")))
    assert detect(cfg) == "descriptor"
    got = read(cfg)
    want = load_file(DSI / "opt" / "reference_fp16.safetensors")
    assert all(torch.equal(got[n], want[n]) for n in want)
