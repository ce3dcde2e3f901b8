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


DEEPSPEED = FIXTURES / "deepspeed"
DS_CASES = [f"{ws}/{name}" for ws in ("ws1", "ws2")
            for name in ("gpt2_zero0", "gpt2_zero2", "gpt2_zero3", "gptneo_ds_inference/presharded")]


@pytest.mark.parametrize("case", DS_CASES)
@pytest.mark.parametrize("via_tp", [1, 2])
def test_deepspeed_fixture_to_hf_equals_reference(case, via_tp, tmp_path):
    folder = DEEPSPEED / case.replace("/presharded", "")
    ref_file = next(folder.glob("reference_fp*.safetensors"))
    reference = load_file(ref_file)
    src = DEEPSPEED / case
    if via_tp > 1:
        reshard(src, tmp_path / "tp", tp=via_tp, progress=False)
        src = tmp_path / "tp"
    reshard(src, tmp_path / "hf", tp=1, to="hf", progress=False)
    got = load_file(tmp_path / "hf" / "model.safetensors")
    tied = {"lm_head.weight"} - set(got)
    assert set(got) | tied == set(reference)
    for name, t in got.items():
        assert torch.equal(t, reference[name].to(t.dtype)), name
    # transformers loads the folder (config copied, tied head restored)
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert torch.equal(model.get_output_embeddings().weight.detach(),
                       reference["lm_head.weight"].float() if "lm_head.weight" in reference
                       else model.get_input_embeddings().weight.detach())
