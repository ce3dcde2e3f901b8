"""Issue 6.1: pickles that would run code, planted in the three pickled layouts dsinfer reads
(HF pytorch_model.bin, Megatron model_optim_rng.pt `args`, DeepSpeed *_model_states.pt), are
refused by every entry point with one clear line naming the file, and no code runs."""
import json

import pytest
import torch
import transformers as tf

import dsinfer
import reliability_support as rs
from dsinfer.formats import UnsafePickleError

LAYOUTS = {
    # layout -> (session source, planting function, tutorial checkpoint.json for it)
    "hf_bin": ("gpt2_bin", rs.plant_hf_bin,
               {"type": "BLOOM", "version": 1.0, "checkpoints": ["pytorch_model.bin"]}),
    "megatron_args": ("megatron", rs.plant_megatron_args,
                      {"type": "Megatron", "version": 3.0, "checkpoints": [
                          "iter_0000001/mp_rank_00/model_optim_rng.pt",
                          "iter_0000001/mp_rank_01/model_optim_rng.pt"]}),
    "deepspeed_states": ("deepspeed", rs.plant_deepspeed_states,
                         {"type": "ds_model", "version": 1.0,
                          "checkpoints": ["global_step1/mp_rank_00_model_states.pt"]}),
}
ENTRY_POINTS = ["reshard", "quantize", "inspect", "init_inference"]
PLANTED_NAME = {"hf_bin": "pytorch_model.bin", "megatron_args": "model_optim_rng.pt",
                "deepspeed_states": "mp_rank_00_model_states.pt"}


def hostile(sources, fresh, layout: str, payload: str = "os.system"):
    """A copy of the layout's source with the payload planted; returns (folder, marker)."""
    name, plant, desc = LAYOUTS[layout]
    folder = rs.copy(sources[name], fresh / "src")
    marker = fresh / "CODE_RAN"
    plant(folder, rs.payloads(marker)[payload])
    (folder / "checkpoint.json").write_text(json.dumps(desc))
    return folder, marker


def meta_gpt2(sources):
    config = tf.AutoConfig.from_pretrained(sources["gpt2"])
    with torch.device("meta"):
        return tf.AutoModelForCausalLM.from_config(config)


def run_entry(entry: str, folder, out, sources) -> rs.Outcome:
    if entry == "reshard":
        return rs.cli("reshard", folder, "--tp", 2, "--out", out)
    if entry == "quantize":
        return rs.cli("quantize", folder, "--out", out, "--groups", "per-channel")
    if entry == "inspect":
        return rs.cli("inspect", folder)
    try:
        dsinfer.init_inference(meta_gpt2(sources), checkpoint=str(folder / "checkpoint.json"))
    except UnsafePickleError as e:
        return rs.Outcome(None, "", f"init_inference: {e}\n")
    return rs.Outcome(0, "", "")


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_entry_point_refuses(layout, entry, sources, fresh):
    folder, marker = hostile(sources, fresh, layout)
    before = rs.tree_hash(folder)
    o = run_entry(entry, folder, fresh / "out", sources)
    if entry == "init_inference":
        assert o.code is None and len(o.lines) == 1, o.err
    else:
        rs.assert_one_line(o)
    assert PLANTED_NAME[layout] in o.message and "refused to load" in o.message, o.message
    assert "could run code" in o.message and "system" in o.message, o.message
    assert not marker.exists(), "the pickle ran code"
    assert not (fresh / "out").exists() and not rs.leftovers(fresh)
    assert rs.tree_hash(folder) == before


@pytest.mark.parametrize("payload", ["builtins.exec", "subprocess.call"])
def test_other_payloads(payload, sources, fresh):
    folder, marker = hostile(sources, fresh, "hf_bin", payload)
    o = rs.cli("reshard", folder, "--tp", 1, "--out", fresh / "out")
    rs.assert_one_line(o, "pytorch_model.bin", "refused to load", payload.split(".")[1])
    assert not marker.exists()


def test_payload_in_a_fresh_interpreter(sources, fresh):
    """The installed console script, as a user runs it: nothing runs, one line, exit 1."""
    folder, marker = hostile(sources, fresh, "megatron_args")
    o = rs.console("reshard", folder, "--tp", 1, "--out", fresh / "out", cwd=fresh)
    rs.assert_one_line(o, "mp_rank_00/model_optim_rng.pt", "refused to load")
    assert not marker.exists() and not (fresh / "out").exists()


def test_planted_files_really_run_code(sources, fresh):
    """Control: the planted files are live exploits (an unsafe torch.load runs them)."""
    folder, marker = hostile(sources, fresh, "deepspeed_states")
    torch.load(folder / "global_step1" / "mp_rank_00_model_states.pt", weights_only=False)
    assert marker.exists()
