"""Megatron-DeepSpeed pipeline checkpoints (DeepSpeed's PipelineModule: one
layer_XX-model_YY-model_states.pt per spec layer and TP rank, Megatron's args in
mp_rank_XX_model_states.pt): read through formats/megatron_ds_pipe.py, equal to the legacy
reading of the same weights; megatron-core's real files re-packed give the oracle logits."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from dsinfer.formats import CheckpointError, ReadOptions, deepspeed, detect, megatron
from dsinfer.formats import open_checkpoint
from dsinfer.formats.safe_pickle import load_pt
from helpers import hf_models
from helpers.checkpoints import hf_model, logits
from helpers.checkpoints import load_tensors as tensors
from helpers.megatron_deepspeed import (install_enums, legacy_ranks, mds_llama_args,
                                        plain_args, to_pipeline)
from helpers.megatron_writer import write_megatron

MEGATRON = FIXTURES / "megatron"
VOCAB = 100


@pytest.fixture(scope="module")
def gpt2():
    model = hf_models.build("gpt2", seed=5, vocab_size=VOCAB, n_layer=3)
    return model, {n: p.detach().clone() for n, p in model.named_parameters()}, \
        model.config.to_dict()


@pytest.fixture
def gpt2_pipe(tmp_path, gpt2):
    _, want, config = gpt2
    write_megatron(tmp_path / "legacy", want, config, tp=2, names="new")
    ranks = legacy_ranks(tmp_path / "legacy", 2)
    args = plain_args(ranks[0]["args"], pipeline_model_parallel_size=3)
    return to_pipeline([r["model"] for r in ranks], tmp_path / "mds", args)


def test_gpt2_reads_like_legacy(gpt2_pipe, tmp_path, gpt2):
    """BigScience numbering (blocks from spec index 3), TP 2, tied embeddings, biases."""
    _, want, _ = gpt2
    assert detect(gpt2_pipe) == "megatron"
    ckpt = megatron.read(gpt2_pipe, ReadOptions(vocab_size=VOCAB))
    got = tensors(ckpt)
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert ckpt.config == megatron.read(tmp_path / "legacy", ReadOptions(vocab_size=VOCAB)).config
    assert ckpt.source == {"format": "megatron", "layout": "megatron-deepspeed pipeline",
                           "tp_size": 2, "pp_size": 3, "checkpoint_version": 3.0,
                           "iteration": 5}


def test_tag_folder_through_the_deepspeed_reader(gpt2_pipe, gpt2):
    _, want, _ = gpt2
    tag = gpt2_pipe / "global_step5"
    assert detect(tag) == "megatron"            # its parent has Megatron's tracker
    (gpt2_pipe / "latest_checkpointed_iteration.txt").unlink()
    assert detect(gpt2_pipe) == "deepspeed"     # `latest` alone: DeepSpeed's layout, Megatron's args
    got = tensors(deepspeed.read(gpt2_pipe, ReadOptions(vocab_size=VOCAB)))
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_saved_copy_of_the_tied_head_is_dropped(tmp_path, gpt2):
    _, want, config = gpt2
    write_megatron(tmp_path / "legacy", want, config, tp=1, names="new")
    ranks = legacy_ranks(tmp_path / "legacy", 1)
    root = to_pipeline([r["model"] for r in ranks], tmp_path / "mds", plain_args(ranks[0]["args"]),
                       first_block=2, head_copy=True)
    got = tensors(megatron.read(root, ReadOptions(vocab_size=VOCAB)))
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)


@pytest.fixture
def megatron_enums(monkeypatch):
    return install_enums(monkeypatch)


def _real_llama_pipe(tmp_path, enums, **changes) -> Path:
    ranks = legacy_ranks(MEGATRON / "llama_tp2", 2)
    args = mds_llama_args(ranks[0]["args"], **changes)
    args.position_embedding_type = enums.absolute
    return to_pipeline([r["model"] for r in ranks], tmp_path / "mds", args, first_block=2)


def test_real_megatron_llama_with_megatron_deepspeed_args(tmp_path, megatron_enums):
    """megatron-core's TP 2 Llama (GQA, SwiGLU, RoPE, untied head) in the pipeline layout with
    Megatron-DeepSpeed's args: the same tensors and config as the legacy reading, and the live
    model's logits."""
    root = _real_llama_pipe(tmp_path, megatron_enums)
    ckpt = open_checkpoint(root)
    got = tensors(ckpt)
    legacy = megatron.read(MEGATRON / "llama_tp2", ReadOptions())
    want = tensors(legacy)
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in got)
    assert ckpt.config == legacy.config
    oracle = load_file(MEGATRON / "llama_tp2" / "oracle.safetensors")
    out = logits(hf_model(ckpt.config, got), oracle["input_ids"])
    assert (out - oracle["logits"]).abs().max() <= 1e-4 * oracle["logits"].abs().max()


@pytest.mark.parametrize("changes, needle", [
    (dict(num_experts=[4]), r"mixture-of-experts layers \(args\.num_experts=\[4\]\)"),
    (dict(glu_activation="swiglu"), r"BigScience's GLU MLP"),
    (dict(embed_layernorm=True), r"--embed-layernorm but the embedding has no "
                                 r"word_embeddings.norm tensors"),
])
def test_unsupported_megatron_deepspeed_features(tmp_path, megatron_enums, changes, needle):
    root = _real_llama_pipe(tmp_path, megatron_enums, **changes)
    with pytest.raises(CheckpointError, match=needle):
        megatron.read(root, ReadOptions())


def test_alibi_position_enum_is_named(tmp_path, gpt2, megatron_enums):
    _, want, config = gpt2
    write_megatron(tmp_path / "legacy", want, config, tp=1, names="new")
    ranks = legacy_ranks(tmp_path / "legacy", 1)
    args = plain_args(ranks[0]["args"], position_embedding_type=None)
    args.position_embedding_type = megatron_enums.alibi
    root = to_pipeline([r["model"] for r in ranks], tmp_path / "mds", args)
    with pytest.raises(CheckpointError, match=r"embedding norm=False\) do not fit "
                                              r"BloomForCausalLM"):
        megatron.read(root, ReadOptions(vocab_size=VOCAB))


def test_rotary_buffers_and_non_tensors_in_blocks_are_skipped(gpt2_pipe, gpt2):
    """Some Megatron-DeepSpeed versions keep the rotary inv_freq buffer in each block's state."""
    _, want, _ = gpt2
    for r in (0, 1):
        path = _tag(gpt2_pipe) / f"layer_03-model_{r:02d}-model_states.pt"
        state = dict(load_pt(path))
        state.update({"self_attention.rotary_emb.inv_freq": torch.ones(4),
                      "self_attention.core_attention._extra_state": None})
        torch.save(state, str(path) + ".new")
        Path(str(path) + ".new").replace(path)
    got = tensors(megatron.read(gpt2_pipe, ReadOptions(vocab_size=VOCAB)))
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_parameter_free_layers_are_skipped(gpt2_pipe, gpt2):
    """DeepSpeed saves an empty state dict for a parameter-free module in the spec list:
    before the embedding, between blocks (its index then sits between theirs) or at the end."""
    _, want, _ = gpt2
    tag = _tag(gpt2_pipe)
    for r in (0, 1):     # blocks 3, 4, 5 -> 3, 5, 6 with an empty layer 4; norm 7 -> 8
        for src, dst in ((7, 8), (5, 6), (4, 5)):
            (tag / f"layer_{src:02d}-model_{r:02d}-model_states.pt").rename(
                tag / f"layer_{dst:02d}-model_{r:02d}-model_states.pt")
        for idx in (0, 4, 9):
            torch.save({}, tag / f"layer_{idx:02d}-model_{r:02d}-model_states.pt")
    got = tensors(megatron.read(gpt2_pipe, ReadOptions(vocab_size=VOCAB)))
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_cli_reshards_it(gpt2_pipe, tmp_path, gpt2):
    _, want, _ = gpt2
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "dsinfer.tools.reshard", str(gpt2_pipe), "--out",
                        str(out), "--tp", "1", "--to", "hf", "--vocab-size", str(VOCAB),
                        "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = load_file(out / "model.safetensors")
    assert all(torch.equal(got[n], want[n]) for n in want if n in got)


# ---- damaged folders: one clear error each ---------------------------------------------------

def _tag(root: Path) -> Path:
    return root / "global_step5"


@pytest.mark.parametrize("damage, needle", [
    (lambda t: (t / "layer_04-model_01-model_states.pt").unlink(),
     r"layer 04 exists for one TP rank but not another"),
    (lambda t: [(t / f"layer_04-model_{r:02d}-model_states.pt").unlink() for r in (0, 1)],
     r"layer_04-model_00-model_states.pt: missing between the transformer blocks"),
    (lambda t: [p.unlink() for p in t.glob("layer_*-model_01-*")],
     r"no layer files of TP rank 1 .*the args say TP 2"),
    (lambda t: [p.unlink() for p in t.glob("mp_rank_*")],
     r"without mp_rank_00_model_states.pt, which holds Megatron's args"),
    (lambda t: [torch.save({"rotary.freqs": torch.ones(2)},
                           t / f"layer_02-model_{r:02d}-model_states.pt") for r in (0, 1)],
     r"layer_02-model_00-model_states.pt: a pipeline layer with tensors \['rotary.freqs'\]"),
    (lambda t: [torch.save({"weight": torch.ones(64)},
                           t / f"layer_04-model_{r:02d}-model_states.pt") for r in (0, 1)],
     r"layer_04-model_00-model_states.pt: a final norm between transformer blocks"),
    (lambda t: torch.save([1, 2], t / "layer_03-model_00-model_states.pt"),
     r"layer_03-model_00-model_states.pt: holds a list, not a layer state dict"),
    (lambda t: [(t / f"layer_{i:02d}-model_{r:02d}-model_states.pt").unlink()
                for r in (0, 1) for i in (3, 4, 5)],
     r"no transformer block files"),
])
def test_damaged_pipeline_folder(gpt2_pipe, damage, needle):
    damage(_tag(gpt2_pipe))
    with pytest.raises(CheckpointError, match=needle):
        tensors(megatron.read(gpt2_pipe, ReadOptions(vocab_size=VOCAB)))


def test_missing_last_block_is_counted(gpt2_pipe):
    """The last block's files gone: the blocks are consecutive, but fewer than num_layers."""
    for r in (0, 1):
        (_tag(gpt2_pipe) / f"layer_05-model_{r:02d}-model_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"layer_05-model_00-model_states.pt: missing; the "
                                              r"args say num_layers=3"):
        megatron.read(gpt2_pipe, ReadOptions(vocab_size=VOCAB))


# ---- BLOOM as BigScience's Megatron-DeepSpeed trained it --------------------------------------

# HF names of the families whose blocks keep Megatron's own keys (per-head fused QKV):
# embedding keys, block prefix and key renames, final norm prefix, untied head
HF_PIPE_NAMES = {
    "bloom": ({"word_embeddings.weight": "transformer.word_embeddings.weight",
               "word_embeddings.norm.weight": "transformer.word_embeddings_layernorm.weight",
               "word_embeddings.norm.bias": "transformer.word_embeddings_layernorm.bias"},
              "transformer.h.{i}.", (), "transformer.ln_f.", None),
    "gpt_neox": ({"word_embeddings.weight": "gpt_neox.embed_in.weight"},
                 "gpt_neox.layers.{i}.", (("attention.", "self_attention."),),
                 "gpt_neox.final_layer_norm.", "embed_out.weight"),
}


def _hf_rank(hf: Dict[str, torch.Tensor], family: str, tp: int, r: int, layers: int):
    """TP rank r of an HF BLOOM / GPT-NeoX state as the pipeline's layer dicts (Megatron's
    names): column-parallel rows (QKV per head, fc1, vocabulary) and row-parallel columns
    (dense, fc2) cut, norms and row-parallel biases replicated."""
    emb_names, block, renames, final, head = HF_PIPE_NAMES[family]

    def cut(t, dim):
        return t.chunk(tp, dim)[r].clone()
    emb = {k: (cut(hf[n], 0) if k == "word_embeddings.weight" else hf[n])
           for k, n in emb_names.items()}
    dims = {"self_attention.query_key_value": 0, "mlp.dense_h_to_4h": 0,
            "self_attention.dense": 1, "mlp.dense_4h_to_h": 1}
    blocks = []
    for i in range(layers):
        out, prefix = {}, block.format(i=i)
        for name, t in hf.items():
            if not name.startswith(prefix):
                continue
            key = name[len(prefix):]
            for old, new in renames:
                key = key.replace(old, new)
            module, part = key.rsplit(".", 1)
            dim = dims.get(module)
            split = dim is not None and not (part == "bias" and dim == 1)
            out[key] = cut(t, dim if part == "weight" else 0) if split else t.clone()
        blocks.append(out)
    layers_ = [emb, *blocks, {"weight": hf[final + "weight"], "bias": hf[final + "bias"]}]
    head = head and next(n for n in (head, "lm_head.weight") if n in hf)  # transformers 5.2x
    return layers_ + ([{"lm_head.weight": cut(hf[head], 0)}] if head else [])


def _write_hf_pipe(tag: Path, hf, family: str, args, tp: int = 2, first_block: int = 3):
    """The HF state as a Megatron-DeepSpeed pipeline save under `tag` (blocks from spec index
    `first_block`, one parameter-free spec before the final norm)."""
    tag.mkdir(parents=True)
    for r in range(tp):
        emb, *rest = _hf_rank(hf, family, tp, r, args.num_layers)
        blocks, tail = rest[:args.num_layers], rest[args.num_layers:]
        files = {1: emb, **{first_block + i: b for i, b in enumerate(blocks)}}
        files.update({first_block + len(blocks) + 1 + j: t for j, t in enumerate(tail)})
        for idx, layer in files.items():
            torch.save(layer, tag / f"layer_{idx:02d}-model_{r:02d}-model_states.pt")
        torch.save({"module": None, "args": args, "checkpoint_version": 3.0,
                    "iteration": int(tag.name.removeprefix("global_step"))},
                   tag / f"mp_rank_{r:02d}_model_states.pt")
    (tag.parent / "latest").write_text(tag.name)
    (tag.parent / "latest_checkpointed_iteration.txt").write_text(
        tag.name.removeprefix("global_step"))
    return tag.parent


def _bloom_pipe(tmp_path: Path, enums):
    """A tiny HF BLOOM and its save as BigScience's Megatron-DeepSpeed writes it: TP 2, PP 2,
    blocks from spec index 3, args with --embed-layernorm and the alibi position enum."""
    model = hf_models.build("bloom", seed=7)
    hf = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = model.config
    args = argparse.Namespace(
        num_layers=cfg.n_layer, hidden_size=cfg.hidden_size, num_attention_heads=cfg.n_head,
        ffn_hidden_size=4 * cfg.hidden_size, kv_channels=cfg.hidden_size // cfg.n_head,
        seq_length=64, max_position_embeddings=64, layernorm_epsilon=cfg.layer_norm_epsilon,
        tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
        padded_vocab_size=cfg.vocab_size, embed_layernorm=True,
        position_embedding_type=enums.alibi, glu_activation=None,
        bias_gelu_fusion=True, openai_gelu=False, init_method_std=0.0048, fp16=True,
        hidden_dropout=0.0, attention_dropout=0.0, pp_partition_method="type:transformer")
    return model, hf, _write_hf_pipe(tmp_path / "bloom" / "global_step9", hf, "bloom", args)


def test_bloom_from_bigscience_megatron_deepspeed(tmp_path, megatron_enums):
    """BLOOM's layout (ALiBi, the embedding LayerNorm, tanh GELU, per-head fused QKV):
    BloomForCausalLM's own tensors and its logits."""
    model, hf, root = _bloom_pipe(tmp_path, megatron_enums)
    ckpt = open_checkpoint(root)
    assert ckpt.config["architectures"] == ["BloomForCausalLM"]
    got = tensors(ckpt)
    assert sorted(got) == sorted(hf) and all(torch.equal(got[n], hf[n]) for n in hf)
    ids = hf_models.inputs(model)["input_ids"]
    torch.testing.assert_close(logits(hf_model(ckpt.config, got), ids), logits(model, ids),
                               rtol=0, atol=1e-5)


def test_bloom_pipeline_save_serves_through_init_inference(tmp_path, megatron_enums):
    """What a BLOOM user does: init_inference(checkpoint=<the Megatron-DeepSpeed save>) on an
    empty BloomForCausalLM, with kernel injection: the trained model's logits."""
    import transformers
    import dsinfer
    model, _, root = _bloom_pipe(tmp_path, megatron_enums)
    with torch.device("meta"):
        skeleton = transformers.BloomForCausalLM(model.config)
    engine = dsinfer.init_inference(skeleton, dtype=torch.float32, checkpoint=str(root),
                                    replace_with_kernel_inject=True)
    ids = hf_models.inputs(model)["input_ids"]
    with torch.no_grad():
        got, want = engine.module(ids).logits, model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_gpt_neox_style_megatron_model(tmp_path):
    """A Megatron GPT with LayerNorm, GELU, biases and partial RoPE (--position-embedding-type
    rope --rotary-percent 0.5), untied: a sequential GPTNeoXForCausalLM, bit-exact, its
    logits, and the same served by init_inference(checkpoint=<the save>) with injection."""
    model = hf_models.build("gpt_neox", seed=11, use_parallel_residual=False,
                            hidden_act="gelu_new", tie_word_embeddings=False,
                            rope_parameters={"rope_type": "default", "rope_theta": 5000.0,
                                             "partial_rotary_factor": 0.5})
    hf = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = model.config
    args = argparse.Namespace(
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, ffn_hidden_size=cfg.intermediate_size,
        kv_channels=cfg.hidden_size // cfg.num_attention_heads, seq_length=64,
        max_position_embeddings=cfg.max_position_embeddings,
        layernorm_epsilon=cfg.layer_norm_eps, tensor_model_parallel_size=2,
        pipeline_model_parallel_size=1, padded_vocab_size=cfg.vocab_size,
        normalization="LayerNorm", position_embedding_type="rope", rotary_percent=0.5,
        rotary_base=5000, swiglu=False, bias_gelu_fusion=True, openai_gelu=False,
        untie_embeddings_and_output_weights=True, init_method_std=0.02, hidden_dropout=0.0,
        attention_dropout=0.0)
    root = _write_hf_pipe(tmp_path / "neox" / "global_step3", hf, "gpt_neox", args,
                          first_block=2)
    ckpt = open_checkpoint(root)
    assert ckpt.config["architectures"] == ["GPTNeoXForCausalLM"]
    got = tensors(ckpt)
    # on disk the head is embed_out.weight (Pythia's name); newer transformers call the module
    # lm_head and rename at load
    if "lm_head.weight" in hf:
        got["lm_head.weight"] = got.pop("embed_out.weight")
    assert sorted(got) == sorted(hf) and all(torch.equal(got[n], hf[n]) for n in hf)
    ids = hf_models.inputs(model)["input_ids"]
    torch.testing.assert_close(logits(hf_model(ckpt.config, got), ids), logits(model, ids),
                               rtol=0, atol=1e-5)
    import transformers
    import dsinfer
    with torch.device("meta"):
        skeleton = transformers.GPTNeoXForCausalLM(model.config)
    engine = dsinfer.init_inference(skeleton, dtype=torch.float32, checkpoint=str(root),
                                    replace_with_kernel_inject=True)
    with torch.no_grad():
        torch.testing.assert_close(engine.module(ids).logits, model(ids).logits,
                                   rtol=1e-4, atol=1e-4)
