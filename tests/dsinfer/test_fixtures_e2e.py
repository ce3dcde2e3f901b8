"""Real checkpoints written by megatron-core and DeepSpeed, through the whole reshard path:
source -> dsinfer TP N -> HF folder -> transformers `from_pretrained` -> the oracle's logits."""
import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from conftest import FIXTURES
from dsinfer.reshard import reshard

MEGATRON = FIXTURES / "megatron"
# fixture -> (TP degrees to pass through, oracle folder, oracle key)
MEGATRON_CASES = {
    "gpt2_tp1": ([1, 4], "gpt2_tp1", "logits"),
    "gpt2_tp2": ([1, 4], "gpt2_tp2", "logits"),
    "gpt2_tp1_pp2": ([1, 4], "gpt2_tp1_pp2", "logits"),
    "llama_tp1": ([1, 2], "llama_tp1", "logits"),      # 2 KV groups: TP 4 is refused
    "llama_tp2": ([1, 2], "llama_tp2", "logits"),
    "llama_tp2_pp2": ([1, 2], "llama_tp2_pp2", "logits"),
    "llama_bf16_tp2": ([1, 2], "llama_bf16_tp2", "logits_fp32_upcast"),
    "llama_tp2_with_rng": ([1, 2], "llama_tp2", "logits"),
}


def _hf_logits(folder, input_ids):
    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("name", list(MEGATRON_CASES))
def test_megatron_fixture_to_hf_matches_oracle(name, tmp_path):
    tps, oracle_dir, key = MEGATRON_CASES[name]
    oracle = load_file(MEGATRON / oracle_dir / "oracle.safetensors")
    for tp in tps:
        src = MEGATRON / name
        if tp > 1:
            reshard(src, tmp_path / f"tp{tp}", tp=tp, progress=False)
            src = tmp_path / f"tp{tp}"
        out = tmp_path / f"hf_via_tp{tp}"
        reshard(src, out, tp=1, to="hf", dtype="float32", progress=False)
        logits = _hf_logits(out, oracle["input_ids"])
        want = oracle[key]
        err = (logits - want).abs().max().item()
        assert err <= 1e-4 * want.abs().max().item(), (name, tp, err)


def test_megatron_tp4_refused_for_two_kv_groups(tmp_path):
    from dsinfer.formats import CheckpointError
    with pytest.raises(CheckpointError, match="2 KV heads do not divide by TP 4"):
        reshard(MEGATRON / "llama_tp2", tmp_path / "o", tp=4, progress=False)
    assert not (tmp_path / "o").exists()


def test_megatron_vocab_size_strips_padding(tmp_path):
    reshard(MEGATRON / "gpt2_tp2", tmp_path / "hf", tp=1, to="hf", vocab_size=100, progress=False)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["vocab_size"] == 100
    oracle = load_file(MEGATRON / "gpt2_tp2" / "oracle.safetensors")
    logits = _hf_logits(tmp_path / "hf", oracle["input_ids"])
    want = oracle["logits"][..., :100]
    # removing padding rows changes nothing for the real vocab rows
    assert (logits - want).abs().max().item() <= 1e-4 * want.abs().max().item()
