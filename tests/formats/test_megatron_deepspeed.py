"""Megatron-DeepSpeed checkpoints (Megatron's legacy model dict saved through DeepSpeed's
engine: ROOT/latest + ROOT/global_stepN/mp_rank_XX_model_states.pt with the model under
"module"): read by the Megatron reader from the save folder, the tag folder, or through the
DeepSpeed reader, equal to the legacy reading of the same model."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from dsinfer.formats import CheckpointError, ReadOptions, deepspeed, detect, megatron
from dsinfer.formats import open_checkpoint
from dsinfer.formats.safe_pickle import load_pt
from helpers import hf_models
from helpers.checkpoints import load_tensors as tensors
from helpers.megatron_writer import write_megatron

MEGATRON = FIXTURES / "megatron"
VOCAB = 100


def _deepspeed_state(state: dict, tp: int, step: int) -> dict:
    """One rank's Megatron legacy state as Megatron-DeepSpeed's engine saves it: the model dict
    as "module" beside DeepSpeed's entries, Megatron's own entries as client state."""
    out = {"module": state["model"], "buffer_names": [], "optimizer": None,
           "param_shapes": None, "frozen_param_shapes": None, "shared_params": {},
           "lr_scheduler": {"last_batch_iteration": step}, "sparse_tensor_module_names": set(),
           "skipped_steps": 0, "global_steps": step, "global_samples": 8 * step,
           "dp_world_size": 1, "mp_world_size": tp, "ds_config": {"train_batch_size": 8},
           "ds_version": "0.9.5"}
    out.update({k: v for k, v in state.items() if k != "model"})   # args, version, iteration
    out["iteration"] = step
    out["args"] = _plain(state["args"])
    return out


def _plain(args):
    """args with the inert stand-ins of megatron classes (enums) as strings, so that it pickles
    again here; the reader looks only at plain fields."""
    plain = (int, float, str, bool, type(None), list, tuple, dict)
    return argparse.Namespace(**{k: v if isinstance(v, plain) else str(v)
                                 for k, v in vars(args).items()})


def to_megatron_deepspeed(legacy: Path, root: Path, tp: int, step: int = 7) -> Path:
    """Re-pack a legacy TP-`tp` (PP 1) checkpoint folder into the Megatron-DeepSpeed layout."""
    (iter_dir,) = [p for p in legacy.iterdir() if p.is_dir()]
    tag = root / f"global_step{step}"
    tag.mkdir(parents=True)
    for r in range(tp):
        state = load_pt(iter_dir / f"mp_rank_{r:02d}" / "model_optim_rng.pt")
        torch.save(_deepspeed_state(state, tp, step), tag / f"mp_rank_{r:02d}_model_states.pt")
    (root / "latest").write_text(tag.name)
    (root / "latest_checkpointed_iteration.txt").write_text(str(step))
    return root


@pytest.fixture(scope="module")
def gpt2():
    model = hf_models.build("gpt2", seed=3, vocab_size=VOCAB, n_layer=2)
    return model, {n: p.detach().clone() for n, p in model.named_parameters()}, \
        model.config.to_dict()


@pytest.fixture
def mds_tp2(tmp_path, gpt2):
    _, want, config = gpt2
    write_megatron(tmp_path / "legacy", want, config, tp=2, names="new")
    return to_megatron_deepspeed(tmp_path / "legacy", tmp_path / "mds", tp=2)


def test_save_folder_reads_like_legacy(mds_tp2, tmp_path, gpt2):
    _, want, _ = gpt2
    assert detect(mds_tp2) == "megatron"
    ckpt = megatron.read(mds_tp2, ReadOptions(vocab_size=VOCAB))
    got = tensors(ckpt)
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)
    legacy = megatron.read(tmp_path / "legacy", ReadOptions(vocab_size=VOCAB))
    assert ckpt.config == legacy.config
    assert ckpt.source == {"format": "megatron", "tp_size": 2, "pp_size": 1,
                           "checkpoint_version": 3.0, "iteration": 7}


def test_tag_folder_alone_goes_through_the_deepspeed_reader(mds_tp2, gpt2):
    """A global_stepN folder copied without its save folder: DeepSpeed's layout, Megatron's
    contents (its args), handed to the Megatron reader."""
    _, want, _ = gpt2
    tag = mds_tp2 / "global_step7"
    (mds_tp2 / "latest_checkpointed_iteration.txt").unlink()
    assert detect(tag) == "deepspeed"
    ckpt = deepspeed.read(tag, ReadOptions(vocab_size=VOCAB))
    assert ckpt.format == "megatron"
    got = tensors(ckpt)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_real_megatron_files_in_deepspeed_layout(tmp_path):
    """megatron-core's own TP 2 files re-packed: the oracle logits still come out."""
    root = to_megatron_deepspeed(MEGATRON / "llama_tp2", tmp_path / "mds", tp=2, step=1)
    ckpt = open_checkpoint(root)
    got = tensors(ckpt)
    legacy = tensors(megatron.read(MEGATRON / "llama_tp2", ReadOptions()))
    assert sorted(got) == sorted(legacy) and all(torch.equal(got[n], legacy[n]) for n in got)
    oracle = load_file(MEGATRON / "llama_tp2" / "oracle.safetensors")
    import transformers
    cfg = transformers.AutoConfig.for_model(**ckpt.config)
    model = getattr(transformers, cfg.architectures[0])(cfg).float().eval()
    model.load_state_dict(got, strict=False)
    with torch.no_grad():
        out = model(input_ids=oracle["input_ids"]).logits
    assert (out - oracle["logits"]).abs().max() <= 1e-4 * oracle["logits"].abs().max()


def test_cli_reshards_it(mds_tp2, tmp_path, gpt2):
    _, want, _ = gpt2
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "dsinfer.tools.reshard", str(mds_tp2), "--out",
                        str(out), "--tp", "1", "--to", "hf", "--vocab-size", str(VOCAB),
                        "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = load_file(out / "model.safetensors")
    assert all(torch.equal(got[n], want[n]) for n in want if n in got)


def _rewrite_rank0(mds: Path, edit):
    path = mds / "global_step7" / "mp_rank_00_model_states.pt"
    state = load_pt(path)           # memory-mapped: write a new file, then replace
    edit(state)
    torch.save(state, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


def test_zero3_empty_module_is_refused(mds_tp2):
    def empty(state):
        lm = state["module"]["language_model"]
        lm["embedding"] = {"word_embeddings": {"weight": torch.empty(0)}}
    _rewrite_rank0(mds_tp2, empty)
    with pytest.raises(CheckpointError, match=r"module tensors are empty .*ZeRO stage 3"):
        tensors(megatron.read(mds_tp2, ReadOptions()))


def test_bad_latest(mds_tp2):
    (mds_tp2 / "latest").write_text("global_step9")
    with pytest.raises(CheckpointError, match=r"latest: names 'global_step9', which is not a "
                                              r"folder here"):
        megatron.read(mds_tp2, ReadOptions())


def test_plain_deepspeed_args_are_not_megatron(tmp_path):
    """An HF model trained with DeepSpeed stores no Megatron args: stays with the DeepSpeed
    reader (which then wants the HF config)."""
    tag = tmp_path / "global_step1"
    tag.mkdir()
    torch.save({"module": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-4),
                "dp_world_size": 1, "mp_world_size": 1}, tag / "mp_rank_00_model_states.pt")
    (tmp_path / "latest").write_text("global_step1")
    assert detect(tmp_path) == "deepspeed"
    with pytest.raises(CheckpointError, match="no config.json"):
        deepspeed.read(tmp_path, ReadOptions())


def test_init_inference_drops_vocab_padding(mds_tp2, gpt2):
    """init_inference(checkpoint=<Megatron save>) on an HF model of the real vocabulary: the
    padding rows Megatron added (100 -> 128) are dropped, the logits are the model's."""
    import transformers
    import dsinfer
    model, _, _ = gpt2
    with torch.device("meta"):
        skeleton = transformers.GPT2LMHeadModel(model.config)
    engine = dsinfer.init_inference(skeleton, dtype=torch.float32, checkpoint=str(mds_tp2))
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = engine.module(ids).logits, model(ids).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
