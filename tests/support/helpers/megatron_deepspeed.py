"""Test-side writers of Megatron-DeepSpeed saves, from Megatron model dicts (one per TP rank, as
Megatron-LM's legacy checkpoints hold them). Independent of dsinfer.formats.

- `to_pipeline`: DeepSpeed's PipelineModule layout (GPTModelPipe): one layer_XX-model_YY file
  per spec layer and TP rank, the args in mp_rank_XX_model_states.pt.
- `to_universal`: what `deepspeed.checkpoint.ds_to_universal` makes of such a run: one
  zero/<param>/fp32.pt per parameter, the TP slices merged by the rules Megatron-DeepSpeed
  declares in its universal_checkpoint_info (TP-replicated: rank 0's; row-parallel: along dim
  1; SwiGLU fc1: gate and up halves each merged; vocabulary: padding cut; the rest along dim 0),
  and the model states copied.
"""
from __future__ import annotations

import argparse
import enum
import re
import sys
import types
from pathlib import Path
from typing import Dict, List

import torch

from dsinfer.formats.safe_pickle import load_pt

PLAIN = (int, float, str, bool, type(None), list, tuple, dict)
# megatron-core names -> the legacy block keys Megatron-DeepSpeed's layers save
MCORE_TO_LEGACY = (("self_attention.linear_qkv.", "self_attention.query_key_value."),
                   ("self_attention.linear_proj.", "self_attention.dense."),
                   ("pre_mlp_layernorm.", "post_attention_layernorm."),
                   ("mlp.linear_fc1.", "mlp.dense_h_to_4h."),
                   ("mlp.linear_fc2.", "mlp.dense_4h_to_h."))


def flat(d: dict, prefix: str = "") -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


def split_layers(names: Dict[str, torch.Tensor]):
    """Legacy or megatron-core names of one TP rank -> (embedding, [block dicts], final norm,
    head) as the pipeline's layers hold them."""
    emb, blocks, norm, head = {}, {}, {}, {}
    for name, t in names.items():
        name = name.removeprefix("language_model.")
        parts = name.split(".")
        if parts[0] == "embedding":
            emb[".".join(parts[1:])] = t
        elif parts[0] in ("encoder", "decoder") and parts[1] == "layers":
            key = ".".join(parts[3:])
            for old, new in MCORE_TO_LEGACY:
                key = key.replace(old, new)
            blocks.setdefault(int(parts[2]), {})[key] = t
        elif parts[0] in ("encoder", "decoder") and parts[1] == "final_layernorm":
            norm[parts[2]] = t
        elif parts[0] == "output_layer":
            head["lm_head.weight"] = t
    return emb, [blocks[i] for i in sorted(blocks)], norm, head


def _spec_layers(state: dict, first_block: int, head_copy: bool = False) -> Dict[int, dict]:
    """Spec index -> the layer's state dict: embedding at 1, blocks from `first_block`, one
    parameter-free spec, the final norm, then an untied head (or with `head_copy` the tied
    embedding again)."""
    emb, blocks, norm, head = split_layers(flat(state))
    layers = {1: emb}
    layers.update({first_block + i: b for i, b in enumerate(blocks)})
    end = first_block + len(blocks) + 1
    layers[end] = norm
    if head:
        layers[end + 1] = head
    elif head_copy:
        layers[end + 1] = {"word_embeddings.weight": emb["word_embeddings.weight"]}
    return layers


def to_pipeline(rank_states: List[dict], root: Path, args, version: float = 3.0,
                first_block: int = 3, step: int = 5, head_copy: bool = False) -> Path:
    """Write TP ranks' model dicts as DeepSpeed's PipelineModule saves a GPTModelPipe (spec
    indices as `_spec_layers`; blocks from 3 is BigScience's numbering, from 2 microsoft's)."""
    tag = root / f"global_step{step}"
    tag.mkdir(parents=True)
    for r, state in enumerate(rank_states):
        for idx, tensors_ in _spec_layers(state, first_block, head_copy).items():
            torch.save({k: t.clone() for k, t in tensors_.items()},
                       tag / f"layer_{idx:02d}-model_{r:02d}-model_states.pt")
        torch.save({"module": None, "args": args, "checkpoint_version": version,
                    "iteration": step, "dp_world_size": 1, "mp_world_size": len(rank_states),
                    "ds_version": "0.14.0", "global_steps": step},
                   tag / f"mp_rank_{r:02d}_model_states.pt")
    (root / "latest").write_text(tag.name)
    (root / "latest_checkpointed_iteration.txt").write_text(str(step))
    return root


# ---- ds_to_universal -------------------------------------------------------------------------

REPLICATED = re.compile(r".*(?:layernorm\.(?:weight|bias)|self_attention\.dense\.bias|"
                        r"mlp\.dense_4h_to_h\.bias|position_embeddings\.weight|"
                        r"^\d+\.(?:weight|bias)|final_layernorm\.(?:weight|bias)|"
                        r"word_embeddings\.norm\.(?:weight|bias))")
ROW_PARALLEL = re.compile(r".*(?:self_attention\.dense|mlp\.dense_4h_to_h)\.weight")
SWIGLU = re.compile(r".*mlp\.dense_h_to_4h\.(?:weight|bias)")
VOCABULARY = re.compile(r".*(?:word_embeddings\.weight|lm_head\.weight|output_layer\.weight)")


def _merge(name: str, slices: List[torch.Tensor], swiglu: bool, vocab: int) -> dict:
    """One parameter's TP slices -> ds_to_universal's fp32.pt dict."""
    out = {}
    if len(slices) > 1 and REPLICATED.fullmatch(name):
        param = slices[0]
    elif swiglu and SWIGLU.fullmatch(name):
        halves = [s.chunk(2, 0) for s in slices]
        param = torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
        out.update(cat_dim=0, param_n_sub_params=2)
    else:
        out["cat_dim"] = 1 if ROW_PARALLEL.fullmatch(name) else 0
        param = torch.cat(slices, out["cat_dim"])
    if VOCABULARY.fullmatch(name):
        param = param[:vocab]
        out["vocab_tensor"] = True
    out["param"] = param.float().clone()
    return out


def _pipe_names(state: dict, first_block: int, tied: bool) -> Dict[str, torch.Tensor]:
    """GPTModelPipe's parameter names: tied_modules.embed.* (tied) or 1.* for the embedding,
    <spec index>.* for the rest."""
    out = {}
    for idx, layer in _spec_layers(state, first_block).items():
        prefix = "tied_modules.embed" if idx == 1 and tied else str(idx)
        out.update({f"{prefix}.{k}": t for k, t in layer.items()})
    return out


def _gptmodel_names(state: dict) -> Dict[str, torch.Tensor]:
    """Megatron-DeepSpeed's GPTModel parameter names (legacy, under language_model.)."""
    emb, blocks, norm, head = split_layers(flat(state))
    out = {f"language_model.embedding.{k}": t for k, t in emb.items()}
    for i, block in enumerate(blocks):
        out.update({f"language_model.encoder.layers.{i}.{k}": t for k, t in block.items()})
    out.update({f"language_model.encoder.final_layernorm.{k}": t for k, t in norm.items()})
    if head:
        out["language_model.output_layer.weight"] = head["lm_head.weight"]
    return out


def to_universal(rank_states: List[dict], root: Path, args, vocab: int, pipe: bool,
                 first_block: int = 2, step: int = 7, version: float = 3.0) -> Path:
    """ROOT/global_step{step}_universal and ROOT/latest_universal, as ds_to_universal writes
    them for a Megatron-DeepSpeed run of these TP ranks (GPTModelPipe's names with `pipe`,
    GPTModel's otherwise); `vocab` = the tokenizer's size (original_vocab_size)."""
    tied = not getattr(args, "untie_embeddings_and_output_weights", False)
    names = [_pipe_names(s, first_block, tied) if pipe else _gptmodel_names(s)
             for s in rank_states]
    tag = root / f"global_step{step}_universal"
    swiglu = bool(getattr(args, "swiglu", False))
    for name in names[0]:
        folder = tag / "zero" / name
        folder.mkdir(parents=True)
        torch.save(_merge(name, [n[name] for n in names], swiglu, vocab), folder / "fp32.pt")
        torch.save(torch.tensor(float(step)), folder / "step.pt")
    info = {"original_vocab_size": vocab}
    for r, n in enumerate(names):
        torch.save({"module": None if pipe else {k: t.clone() for k, t in n.items()},
                    "args": args, "checkpoint_version": version, "iteration": step,
                    "param_shapes": [{k: t.shape for k, t in n.items()}],
                    "dp_world_size": 1, "mp_world_size": len(names),
                    "universal_checkpoint_info": info, "ds_version": "0.14.0"},
                   tag / f"mp_rank_{r:02d}_model_states.pt")
    (root / "latest_universal").write_text(tag.name)
    return root


# ---- args ------------------------------------------------------------------------------------

def plain_args(args, **changes) -> argparse.Namespace:
    """args with the inert stand-ins of megatron classes as strings (so that they pickle again
    here), edited by `changes` (None deletes a field)."""
    a = {k: v if isinstance(v, PLAIN) else str(v) for k, v in vars(args).items()}
    a.update(changes)
    return argparse.Namespace(**{k: v for k, v in a.items() if v is not None})


def legacy_ranks(folder: Path, tp: int) -> List[dict]:
    """The TP ranks' dicts of a legacy Megatron save with one iteration folder."""
    (it,) = [p for p in folder.iterdir() if p.is_dir()]
    return [load_pt(it / f"mp_rank_{r:02d}" / "model_optim_rng.pt") for r in range(tp)]


class PositionEmbeddingType(enum.Enum):   # BigScience Megatron-DeepSpeed's megatron/enums.py
    rotary = 1
    absolute = 2
    alibi = 3


def install_enums(monkeypatch):
    """The enum pickled under Megatron-DeepSpeed's module path, as its args hold it."""
    pkg, mod = types.ModuleType("megatron"), types.ModuleType("megatron.enums")
    mod.PositionEmbeddingType = PositionEmbeddingType
    monkeypatch.setattr(PositionEmbeddingType, "__module__", "megatron.enums")
    monkeypatch.setitem(sys.modules, "megatron", pkg)
    monkeypatch.setitem(sys.modules, "megatron.enums", mod)
    return PositionEmbeddingType


def mds_llama_args(args, **changes):
    """megatron-core's stored args as Megatron-DeepSpeed spells them for a Llama run
    (--normalization rmsnorm --num-key-value-heads --use-rotary-position-embeddings
    --rope-theta; position_embedding_type left at its enum default; dense num_experts [1])."""
    mds = dict(normalization="rmsnorm", num_key_value_heads=args.num_query_groups,
               group_query_attention=None, num_query_groups=None, rotary_base=None,
               rope_theta=float(args.rotary_base), use_rotary_position_embeddings=True,
               num_experts=[1], position_embedding_type=None)
    return plain_args(args, **{**mds, **changes})
