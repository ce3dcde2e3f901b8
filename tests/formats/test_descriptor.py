"""The DeepSpeed tutorial's checkpoint.json descriptors: detection, and dispatch on "type" (and
the shape of "checkpoints") to the reader module that owns that layout."""
import importlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsinfer.formats import CheckpointError, ReadOptions, detect, open_checkpoint
from dsinfer.formats import descriptor

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _write(folder: Path, desc, name="checkpoint.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(desc if isinstance(desc, str) else json.dumps(desc))
    return folder / name


@pytest.mark.parametrize("content, expected", [
    ({"type": "Megatron", "version": 0.0, "checkpoints": ["a.pt"]}, True),
    ({"type": "ds_model", "checkpoints": {"non_tp": [], "tp": []}}, True),
    ({"model_type": "gpt2", "n_embd": 64}, False),          # a config.json
    ({"type": "BLOOM"}, False),
    ([1, 2, 3], False),
    ("{not json", False),
])
def test_sniff(tmp_path, content, expected):
    assert descriptor.sniff(_write(tmp_path, content)) is expected


def test_sniff_wants_a_json_file(tmp_path):
    desc = {"type": "ds_model", "checkpoints": "x"}
    assert not descriptor.sniff(_write(tmp_path, desc, "checkpoint.txt"))
    assert not descriptor.sniff(tmp_path)


# (type as written, checkpoints) -> the (module, function) that must get it
ROUTES = [
    ("Megatron", ["mp_rank_00/model_optim_rng.pt"], ("megatron", "read_descriptor")),
    ("megatron", "mp_rank_00/model_optim_rng.pt", ("megatron", "read_descriptor")),
    ("ds_model", "save_dir", ("deepspeed", "read_descriptor")),
    ("DS_MODEL", ["save_dir/global_step1/mp_rank_00_model_states.pt"],
     ("deepspeed", "read_descriptor")),
    ("ds_model", {"non_tp": [], "tp": ["tp_00_00.pt"]}, ("ds_inference", "read_config_json")),
    ("BLOOM", ["model-00001-of-00002.safetensors"], ("hf", "read_descriptor")),
    ("bloom", ["pytorch_model.bin"], ("hf", "read_descriptor")),
]


@pytest.mark.parametrize("kind, checkpoints, target", ROUTES)
def test_dispatch(tmp_path, monkeypatch, kind, checkpoints, target):
    calls = []
    module = importlib.import_module(f"dsinfer.formats.{target[0]}")
    monkeypatch.setattr(module, target[1], lambda *a: calls.append(a) or "sentinel")  # must exist
    desc = {"type": kind, "checkpoints": checkpoints, "version": 1.0}
    path = _write(tmp_path / "d", desc)
    options = ReadOptions(arch="X")
    assert descriptor.read(path, options) == "sentinel"
    assert calls == [(desc, path.parent, options)]


def test_unknown_type_lists_known_ones(tmp_path):
    path = _write(tmp_path, {"type": "GPT-J", "checkpoints": ["a.pt"]})
    with pytest.raises(CheckpointError, match=r"checkpoint\.json: unknown descriptor type 'GPT-J';"
                                              r" known: megatron, ds_model, bloom"):
        open_checkpoint(path)


def test_wrong_checkpoints_shape(tmp_path):
    path = _write(tmp_path, {"type": "Megatron", "checkpoints": {"tp": ["a.pt"]}})
    with pytest.raises(CheckpointError, match=r"'checkpoints' must be a path or list of paths, "
                                              r"not a \{non_tp, tp\} dict"):
        descriptor.read(path, ReadOptions())


@pytest.mark.parametrize("content", ["{broken", '{"type": "ds_model"}'])
def test_unreadable_descriptor(tmp_path, content):
    with pytest.raises(CheckpointError, match=r"checkpoint\.json: "):
        descriptor.read(_write(tmp_path, content), ReadOptions())


# ---- end to end through the real readers ------------------------------------------------------

def test_bloom_descriptor_reads_hf_shards(tmp_path):
    """HF-named safetensors shards listed by a BLOOM-type descriptor, config.json beside it."""
    ref = load_file(FIXTURES / "deepspeed/ws1/gpt2_zero2/reference_fp32.safetensors")
    names = sorted(ref)
    save_file({n: ref[n] for n in names[:10]}, tmp_path / "model-1.safetensors")
    save_file({n: ref[n] for n in names[10:]}, tmp_path / "model-2.safetensors")
    (tmp_path / "config.json").write_text(
        (FIXTURES / "deepspeed/ws1/gpt2_zero2/config.json").read_text())
    path = _write(tmp_path, {"type": "BLOOM", "version": 1.0,
                             "checkpoints": ["model-1.safetensors", "model-2.safetensors"]})
    assert detect(path) == "descriptor"
    ckpt = open_checkpoint(path)
    assert ckpt.format == "hf" and sorted(ckpt.by_name()) == names
    assert all(torch.equal(t.load(), ref[t.name]) for t in ckpt.tensors)


def test_megatron_descriptor_reads_rank_files(tmp_path):
    iteration = FIXTURES / "megatron/gpt2_tp2/iter_0000001"
    files = [os.path.relpath(iteration / f"mp_rank_{r:02d}/model_optim_rng.pt", tmp_path)
             for r in range(2)]
    path = _write(tmp_path, {"type": "Megatron", "version": 3.0, "checkpoints": files})
    ckpt = open_checkpoint(path)
    assert ckpt.format == "megatron" and ckpt.source["tp_size"] == 2
    assert ckpt.by_name()["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)


def test_ds_model_descriptors_read_deepspeed_checkpoints(tmp_path):
    """Both ds_model shapes: a training save folder and DeepSpeed-Inference's {non_tp, tp}."""
    training = FIXTURES / "deepspeed/ws2/gpt2_zero3"
    ckpt = open_checkpoint(_write(tmp_path, {"type": "ds_model", "version": 1.0,
                                             "checkpoints": os.path.relpath(training, tmp_path)}))
    assert ckpt.format == "deepspeed" and ckpt.source["zero_stage"] == 3
    shards = FIXTURES / "deepspeed/ws2/gptneo_ds_inference/presharded"
    desc = json.loads((shards / "ds_inference_config.json").read_text())
    desc["base_dir"] = os.path.relpath(shards, tmp_path)
    ckpt = open_checkpoint(_write(tmp_path, desc, "inference.json"))
    assert ckpt.format == "ds_inference" and ckpt.source["tp_size"] == 2
