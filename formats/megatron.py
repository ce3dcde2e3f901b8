"""Megatron-LM legacy (`--ckpt-format torch`) GPT checkpoints -> canonical HF tensors.

On disk:
    ROOT/latest_checkpointed_iteration.txt        "1000" or "release"
    ROOT/iter_0001000/ (or ROOT/release/)
        mp_rank_{tp:02d}/model_optim_rng.pt           pipeline size 1 (older files: model_rng.pt)
        mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt  pipeline size > 1
Each file is a pickled dict {"args": argparse.Namespace, "checkpoint_version": 3.0 (absent = 0),
"iteration": N, "model": state}. `state` is either legacy nested dicts
(language_model.{embedding, encoder|transformer, output_layer}, `self_attention.` or older
`attention.` names) or a flat megatron-core dict (embedding.*, decoder.layers.N.*, output_layer.*).
Every pipeline stage numbers its layers from 0.

Megatron-DeepSpeed (`--deepspeed --no-pipeline-parallel`) saves the same legacy model dicts
through DeepSpeed's engine: ROOT/latest (the tag, e.g. "global_step1000") next to the tracker,
ROOT/global_step1000/mp_rank_{tp:02d}_model_states.pt, each a dict whose "module" is the nested
legacy state (Megatron's state_dict_for_save_checkpoint) beside DeepSpeed's own entries and
Megatron's client state (args, checkpoint_version, iteration). Read like the legacy layout. Its
pipeline layout (PipelineModule: layer_XX-model_YY-model_states.pt files) is presented to this
reader as legacy rank files by formats/megatron_ds_pipe.py.

Reading goes native name -> role (NATIVE tables: `qkv.weight` of layer N, ...) -> TP merge of the
rank pieces into one Megatron-global tensor (MERGE) -> HF tensors of the architecture family
(GPT2_NAMES / LLAMA_NAMES: HF name template + picker). Every tensor is merged lazily, when its
TensorRef is loaded; shapes come from running the same code on meta tensors.
"""
from __future__ import annotations

import dataclasses
import re
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import ReadOptions
from .checkpoint import Checkpoint, TensorRef
from .errors import CheckpointError, read_tag_file
from .safe_pickle import load_pt

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILES = ("model_optim_rng.pt", "model_rng.pt")  # newest name first
RANK_DIR = re.compile(r"mp_rank_(\d{2,})(?:_(\d{3,}))?")
ITER_DIR = re.compile(r"iter_(\d+)")
DS_TAG_FILE = "latest"                                          # Megatron-DeepSpeed
DS_MODEL_FILE = re.compile(r"mp_rank_(\d{2,})_model_states\.pt")
DS_STEP_DIR = re.compile(r"global_step(\d+)")
SUPPORTED_VERSIONS = (0.0, 1.0, 2.0, 3.0)
# Rank files are memory-mapped; pages read from a mapping count in RSS until it is dropped, so
# every mapping is dropped (and reopened on demand) after this many bytes of tensors were read.
RELEASE_BYTES = 256 * 1024 ** 2

# ---- native names -> roles ------------------------------------------------------------------

def _compiled(table):
    return [(re.compile(pattern), role) for pattern, role in table]


# Names are matched after removing a leading `language_model.` (legacy nesting, flattened).
# Role None = a copy to drop (legacy: the tied LM head kept on the last pipeline stage).
GLOBAL_NAMES = _compiled([
    (r"embedding\.word_embeddings\.weight", "wte.weight"),
    (r"embedding\.position_embeddings\.weight", "wpe.weight"),
    (r"embedding\.word_embeddings\.norm\.(weight|bias)", "wte_norm.{}"),  # BLOOM (BigScience)
    (r"(?:encoder|transformer|decoder)\.final_(?:layernorm|norm)\.(weight|bias)", "lnf.{}"),
    (r"output_layer\.weight", "head.weight"),
    (r"word_embeddings_for_head\.weight", None),
])
LAYER = re.compile(r"(?:encoder|transformer|decoder)\.layers\.(\d+)\.(.+)")
LAYER_NAMES = _compiled([  # matched against the part after `<stack>.layers.N.`
    (r"input_(?:layernorm|norm)\.(weight|bias)", "ln1.{}"),
    (r"self_attention\.linear_qkv\.layer_norm_(weight|bias)", "ln1.{}"),  # TransformerEngine fused
    (r"(?:self_attention|attention)\.(?:query_key_value|linear_qkv)\.(weight|bias)", "qkv.{}"),
    (r"(?:self_attention|attention)\.(?:dense|linear_proj)\.(weight|bias)", "proj.{}"),
    (r"(?:post_attention_(?:layernorm|norm)|pre_mlp_layernorm)\.(weight|bias)", "ln2.{}"),
    (r"mlp\.linear_fc1\.layer_norm_(weight|bias)", "ln2.{}"),  # TransformerEngine fused
    (r"mlp\.(?:dense_h_to_4h|linear_fc1)\.(weight|bias)", "fc1.{}"),
    (r"mlp\.(?:dense_4h_to_h|linear_fc2)\.(weight|bias)", "fc2.{}"),
])
SKIP = re.compile(r"(?:^|.*\.)(?:_extra_state|inv_freq)")  # TE/fp8 state, rotary buffers

# ---- TP merge: rank pieces -> one Megatron-global tensor -----------------------------------
# Row-parallel weights (proj, fc2) are split along dim 1 and their biases are replicated.


def _replicated(ts, s):
    return ts[0]


def _cat1(ts, s):
    return torch.cat(ts, 1)


def _vocab(ts, s):  # [padded_vocab / tp, hidden] per rank, vocab padding rows kept or stripped
    return torch.cat(ts, 0)[: s.vocab]


def _fc1(ts, s):  # SwiGLU: each rank holds [gate_r; up_r] -> [gate; up]
    if not s.gated:
        return torch.cat(ts, 0)
    halves = [t.chunk(2, 0) for t in ts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)


# Per-rank QKV rows by checkpoint_version, viewed as [groups_r, hpg + 2, hn, *in] (megatron-core
# order: per query group its hpg query heads, then its K head, then its V head). Versions 0 and
# 1.0 predate query groups (hpg = 1): v0 stores [3, np, hn], v1.0 [np, hn, 3], v2.0+ [np, 3, hn]
# (Megatron-LM's fix_query_key_value_ordering). k = hpg + 2, d = hn.
QKV_ROWS: Dict[float, Callable] = {
    0.0: lambda t, k, d: t.view(k, -1, d, *t.shape[1:]).transpose(0, 1),
    1.0: lambda t, k, d: t.view(-1, d, k, *t.shape[1:]).transpose(1, 2),
    2.0: lambda t, k, d: t.view(-1, k, d, *t.shape[1:]),
    3.0: lambda t, k, d: t.view(-1, k, d, *t.shape[1:]),
}


def _qkv(ts, s):  # -> [groups, hpg + 2, hn, *in]
    return torch.cat([QKV_ROWS[s.version](t, s.hpg + 2, s.head_dim) for t in ts], 0)


MERGE = {
    "wte.weight": _vocab, "head.weight": _vocab, "wpe.weight": _replicated,
    "wte_norm.weight": _replicated, "wte_norm.bias": _replicated,
    "ln1.weight": _replicated, "ln1.bias": _replicated, "ln2.weight": _replicated,
    "ln2.bias": _replicated, "lnf.weight": _replicated, "lnf.bias": _replicated,
    "qkv.weight": _qkv, "qkv.bias": _qkv,
    "proj.weight": _cat1, "proj.bias": _replicated,
    "fc1.weight": _fc1, "fc1.bias": _fc1,
    "fc2.weight": _cat1, "fc2.bias": _replicated,
}
# Global (merged) shapes the args imply, checked before anything is read.
EXPECTED = {
    "qkv.weight": lambda s: (s.groups, s.hpg + 2, s.head_dim, s.hidden),
    "qkv.bias": lambda s: (s.groups, s.hpg + 2, s.head_dim),
    "proj.weight": lambda s: (s.hidden, s.heads * s.head_dim),
    "fc1.weight": lambda s: (s.ffn * (2 if s.gated else 1), s.hidden),
    "fc2.weight": lambda s: (s.hidden, s.ffn),
    "wte.weight": lambda s: (s.vocab, s.hidden),
}

# ---- pickers: Megatron-global tensor -> HF tensor -------------------------------------------


def _q(m, s):  # [groups, hpg+2, hn, *in] -> [heads * hn, *in]
    return m[:, : s.hpg].reshape(-1, *m.shape[3:])


def _k(m, s):  # -> [groups * hn, *in]
    return m[:, s.hpg].reshape(-1, *m.shape[3:])


def _v(m, s):
    return m[:, s.hpg + 1].reshape(-1, *m.shape[3:])


def _qkv_cat(m, s):  # no GQA: [heads, 3, hn, *in] -> [Q_all; K_all; V_all] = [3 * hidden, *in]
    return m.transpose(0, 1).reshape(-1, *m.shape[3:])


PICK = {
    "same": lambda m, s: m,
    "t": lambda m, s: m.t(),  # Linear [out, in] -> Conv1D [in, out]
    "q": _q, "k": _k, "v": _v,
    "qkv": _qkv_cat,
    "per_head": lambda m, s: m.reshape(-1, *m.shape[3:]),  # [heads, 3, hn, *in]: BLOOM, NeoX
    "qkv_t": lambda m, s: _qkv_cat(m, s).t(),
    "gate": lambda m, s: m.chunk(2, 0)[0],
    "up": lambda m, s: m.chunk(2, 0)[1],
}

# role -> [(HF name, picker)]; {L} = global layer index
GPT2_NAMES = {
    "wte.weight": [("transformer.wte.weight", "same")],
    "wpe.weight": [("transformer.wpe.weight", "same")],
    "ln1.weight": [("transformer.h.{L}.ln_1.weight", "same")],
    "ln1.bias": [("transformer.h.{L}.ln_1.bias", "same")],
    "qkv.weight": [("transformer.h.{L}.attn.c_attn.weight", "qkv_t")],  # Conv1D [hidden, 3*hidden]
    "qkv.bias": [("transformer.h.{L}.attn.c_attn.bias", "qkv")],
    "proj.weight": [("transformer.h.{L}.attn.c_proj.weight", "t")],
    "proj.bias": [("transformer.h.{L}.attn.c_proj.bias", "same")],
    "ln2.weight": [("transformer.h.{L}.ln_2.weight", "same")],
    "ln2.bias": [("transformer.h.{L}.ln_2.bias", "same")],
    "fc1.weight": [("transformer.h.{L}.mlp.c_fc.weight", "t")],
    "fc1.bias": [("transformer.h.{L}.mlp.c_fc.bias", "same")],
    "fc2.weight": [("transformer.h.{L}.mlp.c_proj.weight", "t")],
    "fc2.bias": [("transformer.h.{L}.mlp.c_proj.bias", "same")],
    "lnf.weight": [("transformer.ln_f.weight", "same")],
    "lnf.bias": [("transformer.ln_f.bias", "same")],
    "head.weight": [("lm_head.weight", "same")],
}


def _megatron_blocks(embed: str, block: str, attention: str, lnf: str, head: str,
                     **extra: str) -> Dict[str, List[Tuple[str, str]]]:
    """Role table of a family that kept Megatron's block names (BLOOM, GPT-NeoX): `block`
    ({L} = layer) + input_layernorm, <attention>.query_key_value (per-head [q k v] rows),
    <attention>.dense, post_attention_layernorm, mlp.dense_h_to_4h / dense_4h_to_h; every
    weight with its bias; `extra`: role -> HF name, taken as is."""
    parts = (("ln1", "input_layernorm", "same"),
             ("qkv", f"{attention}.query_key_value", "per_head"),
             ("proj", f"{attention}.dense", "same"), ("ln2", "post_attention_layernorm", "same"),
             ("fc1", "mlp.dense_h_to_4h", "same"), ("fc2", "mlp.dense_4h_to_h", "same"))
    names = {f"{role}.{p}": [(f"{block}{name}.{p}", pick)] for p in ("weight", "bias")
             for role, name, pick in parts}
    names.update({"wte.weight": [(embed, "same")], "head.weight": [(head, "same")],
                  "lnf.weight": [(f"{lnf}.weight", "same")], "lnf.bias": [(f"{lnf}.bias", "same")]})
    names.update({role: [(name, "same")] for role, name in extra.items()})
    return names


BLOOM_NAMES = _megatron_blocks(   # Megatron-DeepSpeed's own names under transformer.
    "transformer.word_embeddings.weight", "transformer.h.{L}.", "self_attention",
    "transformer.ln_f", "lm_head.weight",
    **{"wte_norm.weight": "transformer.word_embeddings_layernorm.weight",
       "wte_norm.bias": "transformer.word_embeddings_layernorm.bias"})
GPT_NEOX_NAMES = _megatron_blocks(  # RoPE (partial or not) lives in the config
    "gpt_neox.embed_in.weight", "gpt_neox.layers.{L}.", "attention",
    "gpt_neox.final_layer_norm", "embed_out.weight")
_ATTN, _MLP = "model.layers.{L}.self_attn.", "model.layers.{L}.mlp."
LLAMA_NAMES = {
    "wte.weight": [("model.embed_tokens.weight", "same")],
    "ln1.weight": [("model.layers.{L}.input_layernorm.weight", "same")],
    "qkv.weight": [(_ATTN + "q_proj.weight", "q"), (_ATTN + "k_proj.weight", "k"),
                   (_ATTN + "v_proj.weight", "v")],
    "qkv.bias": [(_ATTN + "q_proj.bias", "q"), (_ATTN + "k_proj.bias", "k"),
                 (_ATTN + "v_proj.bias", "v")],
    "proj.weight": [(_ATTN + "o_proj.weight", "same")],
    "proj.bias": [(_ATTN + "o_proj.bias", "same")],
    "ln2.weight": [("model.layers.{L}.post_attention_layernorm.weight", "same")],
    "fc1.weight": [(_MLP + "gate_proj.weight", "gate"), (_MLP + "up_proj.weight", "up")],
    "fc1.bias": [(_MLP + "gate_proj.bias", "gate"), (_MLP + "up_proj.bias", "up")],
    "fc2.weight": [(_MLP + "down_proj.weight", "same")],
    "fc2.bias": [(_MLP + "down_proj.bias", "same")],
    "lnf.weight": [("model.norm.weight", "same")],
    "head.weight": [("lm_head.weight", "same")],
}

# Megatron features no HF family here can express: (args field, is it on?, what it is)
UNSUPPORTED = [
    ("num_experts", lambda v: any(n > 1 for n in v) if isinstance(v, (list, tuple)) else bool(v),
     "mixture-of-experts layers"),      # Megatron-DeepSpeed: experts per layer, [1] = dense
    ("glu_activation", bool, "BigScience's GLU MLP (--glu-activation)"),
    ("multi_latent_attention", bool, "multi-latent attention"),
    ("qk_layernorm", bool, "QK layernorm"),
    ("apply_layernorm_1p", bool, "zero-centred norm weights (--apply-layernorm-1p)"),
    ("apply_residual_connection_post_layernorm", bool, "post-norm residuals"),
    ("squared_relu", bool, "a squared-ReLU MLP"),
    ("rotary_interleaved", bool, "interleaved RoPE"),
    ("use_rope_scaling", bool, "Llama-3.1 RoPE scaling"),
    ("rotary_seq_len_interpolation_factor", lambda v: v not in (None, 1, 1.0),
     "RoPE position interpolation"),
    # newer megatron-core switches (their defaults: None / False / "vanilla" / 0)
    ("window_size", lambda v: v is not None and tuple(v) != (-1, -1),
     "sliding-window attention"),
    ("attention_output_gate", bool, "a gate on the attention output"),
    ("qk_l2_norm", bool, "L2-normalised queries and keys"),
    ("layernorm_zero_centered_gamma", bool, "zero-centred norm weights"),
    ("softmax_type", lambda v: v not in (None, "vanilla"), "a non-standard attention softmax"),
    ("rope_type", lambda v: v not in (None, "rope"), "a RoPE variant (--rope-type)"),
    ("mrope_section", lambda v: v is not None, "multimodal RoPE sections"),
    ("no_rope_freq", lambda v: v not in (None, 0), "layers without RoPE (--no-rope-freq)"),
    ("mtp_num_layers", bool, "multi-token-prediction layers"),
    ("experimental_attention_variant", lambda v: v is not None, "an experimental attention"),
    ("linear_attention_freq", lambda v: v is not None, "linear-attention layers"),
    ("glu_linear_offset", lambda v: v not in (None, 0, 0.0), "an offset GLU (--glu-linear-offset)"),
    ("activation_func_clamp_value", lambda v: v is not None, "a clamped activation"),
    ("quick_geglu", bool, "quick GeGLU"),
]


# ---- files ----------------------------------------------------------------------------------

class _Pool:
    """Rank files opened through load_pt; drops every mapping after RELEASE_BYTES of reads."""

    def __init__(self):
        self.files: List["_RankFile"] = []
        self.read = 0

    def open(self, path: Path) -> "_RankFile":
        f = _RankFile(path, self)
        self.files.append(f)
        return f

    def note(self, nbytes: int):
        self.read += nbytes
        if self.read >= RELEASE_BYTES:
            self.read = 0
            for f in self.files:
                f.release()


class RankFileBase:
    """What every rank-file view shares (this module's files, megatron_dist's merged view,
    megatron_ds_pipe's layer files): `shapes` {native name: (shape, dtype)} and meta tensors
    from it. Subclasses add path, args, version, iteration and tensor(name)."""
    shapes: Dict[str, Tuple[tuple, torch.dtype]]

    def meta(self, name: str) -> torch.Tensor:
        shape, dtype = self.shapes[name]
        return torch.empty(shape, dtype=dtype, device="meta")


class _RankFile(RankFileBase):
    """One mp_rank_XX[_YYY] model file: its args and version, and its tensors on demand."""

    def __init__(self, path: Path, pool: _Pool):
        self.path, self._pool = path, pool
        state = load_pt(path)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a Megatron "
                                  "checkpoint dict; point at the Megatron save folder")
        self.args = state.get("args")
        self.version = state.get("checkpoint_version")
        self.iteration = state.get("iteration")
        self._model = _model_state(state, path)
        self.shapes = {n: (tuple(t.shape), t.dtype) for n, t in self._model.items()}
        self.mappable = zipfile.is_zipfile(path)  # legacy (non-zip) pickles are read in full

    def tensor(self, name: str) -> torch.Tensor:
        if self._model is None:
            self._model = _model_state(load_pt(self.path), self.path)
        t = self._model[name]
        self._pool.note(t.numel() * t.element_size())
        return t

    def release(self):
        if self.mappable:
            self._model = None


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _model_state(state: dict, path: Path) -> Dict[str, torch.Tensor]:
    """The file's model tensors, flattened to dotted native names, minus skipped entries."""
    if "model" not in state and isinstance(state.get("module"), dict):   # Megatron-DeepSpeed
        tensors = {n: t for n, t in _flatten(state["module"])
                   if isinstance(t, torch.Tensor) and not SKIP.fullmatch(n)}
        empty = [n for n, t in tensors.items() if t.numel() == 0]
        if empty:
            raise CheckpointError(
                f"{path}: module tensors are empty ({empty[0]}, ...): a ZeRO stage 3 save keeps "
                "the weights only in its optimizer partitions; save the model with ZeRO stage "
                "0-2, or gather it (DeepSpeed's zero_to_fp32) first")
        return tensors
    if "model" not in state:
        chunks = sorted(k for k in state if re.fullmatch(r"model\d+", str(k)))
        if chunks:
            raise CheckpointError(
                f"{path}: holds virtual pipeline chunks ({', '.join(chunks)}), which dsinfer "
                "does not read; convert it to plain pipeline stages with Megatron-LM "
                "(tools/checkpoint/convert.py) first")
        raise CheckpointError(f"{path}: no 'model' entry (keys: {', '.join(map(str, state))}); "
                              "this is not a Megatron model checkpoint")
    return {n: t for n, t in _flatten(state["model"])
            if isinstance(t, torch.Tensor) and not SKIP.fullmatch(n)}


def _model_file(folder: Path) -> Path:
    if folder.is_file():                       # Megatron-DeepSpeed: the rank file itself
        return folder
    for name in MODEL_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no {' or '.join(MODEL_FILES)} in this rank folder; copy "
                          "the rank's model file from the training run")


def _locate(path: Path) -> Tuple[Path, object]:
    """(folder holding the mp_rank_* folders, iteration number or "release")."""
    tracker = path / TRACKER
    if not tracker.is_file():
        m = ITER_DIR.fullmatch(path.name) or DS_STEP_DIR.fullmatch(path.name)
        return path, "release" if path.name == "release" else int(m[1]) if m else None
    tag = read_tag_file(tracker, "write the iteration to load (or 'release') into it")
    if tag == "release":
        folder, iteration = path / "release", "release"
    elif tag.isdigit():
        iteration = int(tag)
        folder = path / f"iter_{iteration:07d}"
        if not folder.is_dir() and (path / DS_TAG_FILE).is_file():
            return _ds_tag_folder(path), iteration
    else:
        raise CheckpointError(f"{tracker}: holds {tag!r}, neither an iteration number nor "
                              "'release'; write the iteration to load into it")
    if not folder.is_dir():
        present = sorted(p.name for p in path.iterdir()
                         if p.is_dir() and (ITER_DIR.fullmatch(p.name) or p.name == "release"))
        raise CheckpointError(f"{folder}: missing, but {tracker.name} names it; restore it or "
                              f"put one of the iterations present ({', '.join(present) or 'none'})"
                              f" into {tracker.name}")
    return folder, iteration


def _ds_tag_folder(path: Path) -> Path:
    """ROOT/latest's tag folder (Megatron-DeepSpeed), checked to exist."""
    latest = path / DS_TAG_FILE
    tag = read_tag_file(latest, "write the tag folder's name (e.g. global_step1000) into it")
    if not tag or "/" in tag or "\\" in tag or tag in (".", "..") or not (path / tag).is_dir():
        raise CheckpointError(f"{latest}: names {tag!r}, which is not a folder here; write the "
                              "tag folder's name (e.g. global_step1000) into it")
    return path / tag


def _rank_dirs(folder: Path) -> Dict[Tuple[int, int], Path]:
    """(tp, pp) -> rank folder, or (Megatron-DeepSpeed) -> the rank's model-states file."""
    found = {}
    for d in folder.iterdir():
        m = RANK_DIR.fullmatch(d.name)
        if m and d.is_dir():
            found[(int(m[1]), int(m[2] or 0))] = d
        m = DS_MODEL_FILE.fullmatch(d.name)
        if m and d.is_file():
            found[(int(m[1]), 0)] = d
    if not found:
        raise CheckpointError(f"{folder}: no mp_rank_XX folders; point at a Megatron save folder "
                              "(with latest_checkpointed_iteration.txt) or one of its iter_XXXXXXX/"
                              "release folders")
    return found


def _open_folder(folder: Path, pool: _Pool) -> List[List[_RankFile]]:
    """Every rank file, as stages[pp][tp], checked complete against the stored args."""
    found = _rank_dirs(folder)
    first = pool.open(_model_file(found[min(found)]))
    tp = _arg(first.args, "tensor_model_parallel_size", 1 + max(t for t, _ in found))
    pp = _arg(first.args, "pipeline_model_parallel_size", 1 + max(p for _, p in found))
    for key in sorted(found):
        if key[0] >= tp or key[1] >= pp:
            raise CheckpointError(f"{found[key]}: unexpected for TP {tp} x PP {pp} (args of "
                                  f"{first.path}); the folder mixes checkpoints: keep one run's "
                                  "mp_rank folders only")
    stages = []
    for p in range(pp):
        row = []
        for t in range(tp):
            name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
            if (t, p) not in found:
                raise CheckpointError(f"{folder / name}: missing; the args say TP {tp} x PP {pp}:"
                                      " copy every mp_rank folder of the checkpoint")
            row.append(first if (t, p) == min(found) else pool.open(_model_file(found[(t, p)])))
        stages.append(row)
    return stages


def _arg(args, name: str, default=None):
    value = getattr(args, name, None)
    return default if value is None else value


# ---- roles ----------------------------------------------------------------------------------

def _role(name: str, path: Path) -> Tuple[Optional[int], Optional[str]]:
    """(local layer or None, role or None to drop) of one native tensor name."""
    short = name[len("language_model."):] if name.startswith("language_model.") else name
    m = LAYER.fullmatch(short)
    table, rest = (LAYER_NAMES, m[2]) if m else (GLOBAL_NAMES, short)
    for pattern, role in table:
        r = pattern.fullmatch(rest)
        if r:
            return (int(m[1]) if m else None), role and role.format(*r.groups())
    raise CheckpointError(
        f"{path}: tensor '{name}' is not part of a Megatron GPT model dsinfer knows (embedding, "
        "<stack>.layers.N.{attention, mlp, norms}, final norm, output_layer); convert the model "
        "with Megatron-LM's tools/checkpoint first")


Pieces = List[Tuple[_RankFile, str]]  # one (file, native name) per TP rank, in rank order


def _stage_roles(files: List[_RankFile]) -> Dict[Tuple[Optional[int], str], Pieces]:
    """(local layer, role) -> pieces of one pipeline stage; every TP rank must agree."""
    per_rank = []
    for f in files:
        roles = {}
        for name in f.shapes:
            layer, role = _role(name, f.path)
            if role is not None:
                roles[(layer, role)] = name
        per_rank.append(roles)
    ref, ref_file = per_rank[0], files[0]
    for f, roles in zip(files[1:], per_rank[1:]):
        for key in [*ref, *(k for k in roles if k not in ref)]:  # file order: stable messages
            if key not in roles or key not in ref:
                holder, name = (ref_file, ref[key]) if key in ref else (f, roles[key])
                lacking = f if key in ref else ref_file
                raise CheckpointError(f"{lacking.path}: lacks tensor '{name}' that {holder.path} "
                                      "has; the rank files come from different models: copy one "
                                      "checkpoint's mp_rank folders")
            if f.shapes[roles[key]] != ref_file.shapes[ref[key]]:
                raise CheckpointError(
                    f"{f.path}: tensor '{roles[key]}' has shape {list(f.shapes[roles[key]][0])} "
                    f"but {list(ref_file.shapes[ref[key]][0])} in {ref_file.path}; the ranks come "
                    "from different checkpoints or TP degrees: copy one checkpoint's mp_rank "
                    "folders")
    return {key: [(f, roles[key]) for f, roles in zip(files, per_rank)] for key in ref}


def _collect(stages: List[List[_RankFile]]) -> Tuple[Dict[str, Pieces], int]:
    """Global role key ('wte.weight', 'layers.3.qkv.weight', ...) -> pieces, and layer count.

    Each stage numbers its layers from 0; global = local + layers on earlier stages (counted
    from the files: Megatron allows uneven splits)."""
    roles: Dict[str, Pieces] = {}
    offset = 0
    for files in stages:
        local = _stage_roles(files)
        layers = {layer for layer, _ in local if layer is not None}
        if layers != set(range(len(layers))):
            raise CheckpointError(f"{files[0].path}: layers {sorted(layers)} are not numbered "
                                  "0..N-1 as Megatron writes them; the file is damaged")
        for (layer, role), pieces in local.items():
            key = role if layer is None else f"layers.{layer + offset}.{role}"
            if key in roles:
                raise CheckpointError(f"{pieces[0][0].path}: tensor '{pieces[0][1]}' also appears "
                                      f"in {roles[key][0][0].path}; the pipeline stages overlap")
            roles[key] = pieces
        offset += len(layers)
    return roles, offset


# ---- the model the args and the weights describe --------------------------------------------

@dataclasses.dataclass
class _Spec:
    """Megatron hyper-parameters, checked against the tensors."""
    layers: int
    hidden: int
    heads: int
    groups: int          # query groups = KV heads
    head_dim: int        # kv_channels
    ffn: int             # per branch for SwiGLU
    vocab: int           # embedding rows kept (padded size, or --vocab-size)
    max_positions: int
    eps: float
    norm: str            # "LayerNorm" | "RMSNorm"
    gated: bool          # SwiGLU
    gelu: str            # HF activation for a plain MLP: "gelu_new" (tanh) | "gelu" (erf)
    position: str        # "learned_absolute" | "rope" | "alibi" | ...
    rotary_percent: float  # of head_dim rotated (the first features, rotate-half pairs)
    embed_norm: bool     # a LayerNorm after the word embeddings (BLOOM)
    bias: str            # which linears have biases: "all" | "none" | "qkv" | "mixed"
    tied: bool
    rope_theta: float
    dtype: torch.dtype
    version: float
    init_std: float
    hidden_dropout: float
    attention_dropout: float

    @property
    def hpg(self) -> int:  # query heads per group
        return self.heads // self.groups

    def features(self) -> dict:
        return {"norm": self.norm, "mlp": "swiglu" if self.gated else "gelu",
                "position": self.position, "bias": self.bias,
                "activation": "silu" if self.gated else self.gelu,
                "rotary percent": self.rotary_percent if self.position == "rope" else 1.0,
                "query groups": self.groups != self.heads, "embedding norm": self.embed_norm,
                "head_dim * heads == hidden": self.head_dim * self.heads == self.hidden}


def _spec(args, roles: Dict[str, Pieces], version: float, options: ReadOptions,
          where: Path) -> _Spec:
    heads, hidden = args.num_attention_heads, args.hidden_size
    wte = roles.get("wte.weight")
    if wte is None:
        raise CheckpointError(f"{where}: no embedding.word_embeddings.weight in the first pipeline "
                              "stage; copy every mp_rank folder of the checkpoint")
    padded = sum(f.shapes[n][0][0] for f, n in wte)
    vocab = options.vocab_size or padded
    if vocab > padded:
        raise CheckpointError(f"{where}: vocab size {vocab} (--vocab-size, or the model's "
                              f"config.vocab_size at load) is larger than the {padded} embedding "
                              f"rows; use at most {padded}")
    if _arg(args, "embed_layernorm", False) and "wte_norm.weight" not in roles:
        raise CheckpointError(f"{where}: the args say --embed-layernorm but the embedding has no "
                              "word_embeddings.norm tensors; copy the embedding's files again")
    return _Spec(
        layers=args.num_layers, hidden=hidden, heads=heads, groups=_groups(args),
        head_dim=_arg(args, "kv_channels", hidden // heads),
        ffn=_arg(args, "ffn_hidden_size", 4 * hidden), vocab=vocab,
        max_positions=_arg(args, "max_position_embeddings", _arg(args, "seq_length", 2048)),
        eps=_arg(args, "norm_epsilon", _arg(args, "layernorm_epsilon", 1e-5)),
        norm=_norm(args), gated=bool(_arg(args, "swiglu", False)),
        gelu=_gelu(args, "layers.0.fc1.bias" in roles), position=_position(args),
        embed_norm="wte_norm.weight" in roles,
        rotary_percent=float(_arg(args, "rotary_percent", 1.0)),
        bias=_bias(roles), tied=not _arg(args, "untie_embeddings_and_output_weights", False),
        rope_theta=float(_arg(args, "rotary_base", _arg(args, "rope_theta", 10000))),
        dtype=wte[0][0].shapes[wte[0][1]][1], version=version,
        init_std=_arg(args, "init_method_std", 0.02),
        hidden_dropout=_arg(args, "hidden_dropout", 0.0),
        attention_dropout=_arg(args, "attention_dropout", 0.0))


# Megatron-LM and Megatron-DeepSpeed spell some args differently; these read either.
NORMS = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}      # MDS: lower case
# position_embedding_type: Megatron-LM a string; Megatron-DeepSpeed an enum (pickled as its
# value: BigScience's rotary = 1, absolute = 2, alibi = 3, or the name as a string)
POSITIONS = {1: "rope", 2: "learned_absolute", 3: "alibi", "rotary": "rope",
             "absolute": "learned_absolute"}


def _norm(args) -> str:
    value = str(_arg(args, "normalization", "LayerNorm"))
    return NORMS.get(value.lower(), value)


def _groups(args) -> int:
    """KV heads: Megatron-LM's num_query_groups (only meaningful with group_query_attention),
    or Megatron-DeepSpeed's num_key_value_heads."""
    if _arg(args, "group_query_attention", False):
        return args.num_query_groups
    return _arg(args, "num_key_value_heads", args.num_attention_heads)


def _position(args) -> str:
    """"rope" | "learned_absolute" | "alibi" | ...: Megatron-DeepSpeed turns RoPE on with
    use_rotary_position_embeddings and leaves position_embedding_type at its default."""
    if _arg(args, "use_rotary_position_embeddings", False):
        return "rope"
    value = _arg(args, "position_embedding_type", "learned_absolute")
    value = getattr(value, "value", value)           # an enum's stand-in: its pickled value
    return POSITIONS.get(value, value)


def _gelu(args, has_bias: bool) -> str:
    """Megatron's MLP activation: openai_gelu and the fused bias_gelu (its default with biases)
    are the tanh approximation; onnx_safe and plain F.gelu are exact."""
    if _arg(args, "openai_gelu", False):
        return "gelu_new"
    if _arg(args, "onnx_safe", False):
        return "gelu"
    return "gelu_new" if _arg(args, "bias_gelu_fusion", True) and has_bias else "gelu"


def _bias(roles: Dict[str, Pieces]) -> str:
    have = tuple(f"layers.0.{r}.bias" in roles for r in ("qkv", "proj", "fc1", "fc2"))
    return {(True,) * 4: "all", (False,) * 4: "none",
            (True, False, False, False): "qkv"}.get(have, "mixed")


def _check_args(args, where: Path):
    if args is None:
        raise CheckpointError(f"{where}: holds no 'args'; dsinfer needs Megatron's stored args "
                              "to know the model's shape: re-save it with Megatron-LM")
    for field, is_on, what in UNSUPPORTED:
        value = getattr(args, field, None)
        if value is not None and is_on(value):
            raise CheckpointError(f"{where}: the model uses {what} (args.{field}={value!r}), "
                                  "which no HF architecture dsinfer writes can express")


def _version(stages: List[List[_RankFile]], default) -> float:
    versions = set()
    for f in (f for row in stages for f in row):
        v = float(f.version if f.version is not None else default or 0)
        if v not in SUPPORTED_VERSIONS:
            raise CheckpointError(f"{f.path}: checkpoint_version {v} is not supported (dsinfer "
                                  "reads 0, 1.0, 2.0, 3.0); re-save it with a Megatron-LM that "
                                  "writes one of these")
        versions.add(v)
    if len(versions) > 1:
        raise CheckpointError(f"{stages[0][0].path}: rank files disagree on checkpoint_version "
                              f"({sorted(versions)}); copy one checkpoint's mp_rank folders")
    return versions.pop()


# ---- architecture families ------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _gpt2_config(s: _Spec) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": s.vocab, "n_positions": s.max_positions, "n_embd": s.hidden,
        "n_layer": s.layers, "n_head": s.heads, "n_inner": s.ffn,
        "activation_function": s.gelu, "layer_norm_epsilon": s.eps,
        "resid_pdrop": s.hidden_dropout, "embd_pdrop": s.hidden_dropout,
        "attn_pdrop": s.attention_dropout, "initializer_range": s.init_std,
        "tie_word_embeddings": s.tied, "torch_dtype": _dtype_name(s.dtype),
    }


def _llama_config(s: _Spec) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": s.vocab, "hidden_size": s.hidden, "intermediate_size": s.ffn,
        "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
        "num_key_value_heads": s.groups, "head_dim": s.head_dim, "hidden_act": "silu",
        "max_position_embeddings": s.max_positions, "rms_norm_eps": s.eps,
        "rope_theta": s.rope_theta, "attention_bias": s.bias == "all",
        "mlp_bias": s.bias == "all", "attention_dropout": s.attention_dropout,
        "initializer_range": s.init_std, "tie_word_embeddings": s.tied,
        "torch_dtype": _dtype_name(s.dtype),
    }


def _bloom_config(s: _Spec) -> dict:
    """BLOOM: ALiBi, a LayerNorm after the embeddings, tanh GELU, per-head fused QKV."""
    return {
        "architectures": ["BloomForCausalLM"], "model_type": "bloom",
        "vocab_size": s.vocab, "hidden_size": s.hidden, "n_layer": s.layers,
        "n_head": s.heads, "layer_norm_epsilon": s.eps, "initializer_range": s.init_std,
        "apply_residual_connection_post_layernorm": False, "hidden_dropout": s.hidden_dropout,
        "attention_dropout": s.attention_dropout, "tie_word_embeddings": s.tied,
        "torch_dtype": _dtype_name(s.dtype),
    }


def _gpt_neox_config(s: _Spec) -> dict:
    """A sequential GPT-NeoX: LayerNorm, GELU, RoPE on the first rotary_percent of each head
    (rotate-half, as Megatron), biases everywhere. Legacy rotary keys for transformers 4."""
    return {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
        "vocab_size": s.vocab, "hidden_size": s.hidden, "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads, "intermediate_size": s.ffn, "hidden_act": s.gelu,
        "max_position_embeddings": s.max_positions, "layer_norm_eps": s.eps,
        "use_parallel_residual": False, "attention_bias": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": s.rope_theta,
                            "partial_rotary_factor": s.rotary_percent},
        "rotary_pct": s.rotary_percent, "rotary_emb_base": s.rope_theta,
        "hidden_dropout": s.hidden_dropout, "attention_dropout": s.attention_dropout,
        "initializer_range": s.init_std, "tie_word_embeddings": s.tied,
        "torch_dtype": _dtype_name(s.dtype),
    }


def _qwen2_config(s: _Spec) -> dict:
    """Llama with biases on Q, K and V only (Megatron's --add-qkv-bias --disable-bias-linear)."""
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": s.vocab, "hidden_size": s.hidden, "intermediate_size": s.ffn,
        "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
        "num_key_value_heads": s.groups, "hidden_act": "silu",
        "max_position_embeddings": s.max_positions, "rms_norm_eps": s.eps,
        "rope_theta": s.rope_theta, "use_sliding_window": False,
        "attention_dropout": s.attention_dropout, "initializer_range": s.init_std,
        "tie_word_embeddings": s.tied, "torch_dtype": _dtype_name(s.dtype),
    }


@dataclasses.dataclass(frozen=True)
class Family:
    architecture: str
    names: Dict[str, List[Tuple[str, str]]]
    requires: Dict[str, tuple]  # feature -> allowed values (see _Spec.features)
    config: Callable[[_Spec], dict]


FAMILIES = {
    "gpt2": Family("GPT2LMHeadModel", GPT2_NAMES, {
        "norm": ("LayerNorm",), "mlp": ("gelu",), "position": ("learned_absolute",),
        "bias": ("all",), "query groups": (False,), "head_dim * heads == hidden": (True,),
        "embedding norm": (False,)}, _gpt2_config),
    "llama": Family("LlamaForCausalLM", LLAMA_NAMES, {
        "norm": ("RMSNorm",), "mlp": ("swiglu",), "position": ("rope",),
        "bias": ("all", "none"), "embedding norm": (False,), "rotary percent": (1.0,)},
        _llama_config),
    "qwen2": Family("Qwen2ForCausalLM", LLAMA_NAMES, {   # HF Qwen2 derives head_dim
        "norm": ("RMSNorm",), "mlp": ("swiglu",), "position": ("rope",), "bias": ("qkv",),
        "head_dim * heads == hidden": (True,), "embedding norm": (False,),
        "rotary percent": (1.0,)}, _qwen2_config),
    "bloom": Family("BloomForCausalLM", BLOOM_NAMES, {
        "norm": ("LayerNorm",), "mlp": ("gelu",), "activation": ("gelu_new",),
        "position": ("alibi",), "bias": ("all",), "query groups": (False,),
        "head_dim * heads == hidden": (True,), "embedding norm": (True,)}, _bloom_config),
    "gpt_neox": Family("GPTNeoXForCausalLM", GPT_NEOX_NAMES, {
        "norm": ("LayerNorm",), "mlp": ("gelu",), "position": ("rope",), "bias": ("all",),
        "query groups": (False,), "head_dim * heads == hidden": (True,),
        "embedding norm": (False,)}, _gpt_neox_config),
}
ARCH_ALIASES = {"gpt2": "gpt2", "gpt2lmheadmodel": "gpt2",
                "llama": "llama", "llamaforcausallm": "llama",
                "qwen2": "qwen2", "qwen2forcausallm": "qwen2",
                "bloom": "bloom", "bloomforcausallm": "bloom",
                "gpt_neox": "gpt_neox", "gptneoxforcausallm": "gpt_neox"}


def _family(s: _Spec, arch: Optional[str], where: Path) -> Family:
    if arch is None:       # the first family the features fit, else the nearest (for the error)
        f = s.features()
        fits = [k for k, fam in FAMILIES.items()
                if all(f[feature] in allowed for feature, allowed in fam.requires.items())]
        llama = f["norm"] == "RMSNorm" or f["mlp"] == "swiglu" or f["query groups"]
        bloom = f["position"] == "alibi" or f["embedding norm"]
        rope = "gpt_neox" if f["position"] == "rope" else "gpt2"
        key = fits[0] if fits else ("qwen2" if s.bias == "qkv" else "llama") if llama \
            else "bloom" if bloom else rope
    elif arch.lower() in ARCH_ALIASES:
        key = ARCH_ALIASES[arch.lower()]
    else:
        raise CheckpointError(f"unknown --arch '{arch}' for a Megatron checkpoint; known: "
                              f"{', '.join(ARCH_ALIASES)}")
    family = FAMILIES[key]
    bad = [f"{k}={v}" for k, v in s.features().items()
           if k in family.requires and v not in family.requires[k]]
    if bad:
        raise CheckpointError(f"{where}: the stored args and tensors ({', '.join(bad)}) do not fit "
                              f"{family.architecture}; pass --arch "
                              f"{' or '.join(k for k in FAMILIES if k != key)} if one fits, else "
                              "the model has no HF equivalent dsinfer writes")
    return family


# ---- lazy tensors ---------------------------------------------------------------------------

def _refs(roles: Dict[str, Pieces], s: _Spec, family: Family) -> List[TensorRef]:
    out = []
    for key, pieces in roles.items():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        layer, role = (int(m[1]), m[2]) if m else (None, key)
        if role not in family.names:
            f, name = pieces[0]
            raise CheckpointError(f"{f.path}: tensor '{name}' has no place in "
                                  f"{family.architecture}; pass --arch for a family that has it")
        merged = _meta_merge(role, pieces, s)
        for template, pick in family.names[role]:
            out.append(_ref(template.format(L=layer), role, pieces, pick, s, merged))
    return out


def _meta_merge(role: str, pieces: Pieces, s: _Spec) -> torch.Tensor:
    """The merged tensor on the meta device (no data read), checked against the args."""
    f, name = pieces[0]
    try:
        merged = MERGE[role]([f.meta(n) for f, n in pieces], s)
    except RuntimeError as e:
        raise CheckpointError(f"{f.path}: tensor '{name}' of shape {list(f.shapes[name][0])} "
                              f"does not fit the stored args ({str(e).splitlines()[0]}); the args "
                              "do not describe these weights") from None
    want = EXPECTED.get(role, lambda s: tuple(merged.shape))(s)
    if tuple(merged.shape) != tuple(want):
        raise CheckpointError(f"{f.path}: tensor '{name}' merges to shape {list(merged.shape)} "
                              f"over {len(pieces)} ranks but the stored args imply {list(want)}; "
                              "the args do not describe these weights")
    return merged


def _ref(name: str, role: str, pieces: Pieces, pick: str, s: _Spec,
         merged_meta: torch.Tensor) -> TensorRef:
    merge, picker = MERGE[role], PICK[pick]
    meta = picker(merged_meta, s)

    def load() -> torch.Tensor:
        # the rank pieces die when merge returns: peak ~ pieces + merged, then merged + result
        merged = merge([f.tensor(n) for f, n in pieces], s)
        return picker(merged, s).contiguous()

    return TensorRef(name, tuple(meta.shape), meta.dtype, load)


# ---- entry points ---------------------------------------------------------------------------

def sniff(path: Path) -> bool:
    """A Megatron save folder (with the tracker file) or an iter_XXXXXXX/release folder."""
    path = Path(path)
    if not path.is_dir():
        return False
    children = list(path.iterdir())
    if (path / TRACKER).is_file():
        # Megatron-DeepSpeed writes the tracker too, next to `latest` and global_stepN folders
        # (plain DeepSpeed runs write `latest` only)
        return True
    if any(RANK_DIR.fullmatch(c.name) and c.is_dir() for c in children):
        return True
    from . import megatron_dist  # megatron_dist imports this module
    if megatron_dist.is_dist_folder(path):  # an iter folder of a torch_dist save
        return True
    # a Megatron-DeepSpeed tag folder: DeepSpeed rank files whose saved args are Megatron's
    return (DS_STEP_DIR.fullmatch(path.name) is not None
            and (path.parent / TRACKER).is_file()
            and any(DS_MODEL_FILE.fullmatch(c.name) for c in children))


def read(path: Path, options: ReadOptions) -> Checkpoint:
    """Read a Megatron-LM legacy checkpoint folder (save folder, iter_XXXXXXX or release)."""
    folder, iteration = _locate(Path(path))
    from . import megatron_dist
    if megatron_dist.is_dist_folder(folder):  # --ckpt-format torch_dist
        return megatron_dist.read_folder(folder, options, iteration)
    from . import megatron_ds_pipe
    if megatron_ds_pipe.is_pipe_folder(folder):  # Megatron-DeepSpeed with PipelineModule
        pool = _Pool()
        ranks, source = megatron_ds_pipe.open_folder(folder, pool)
        pool.files.extend(ranks)
        return _build([ranks], options, iteration, default_version=None, source=source)
    stages = _open_folder(folder, _Pool())
    return _build(stages, options, iteration, default_version=None)


def read_descriptor(desc: dict, base: Path, options: ReadOptions) -> Checkpoint:
    """Read the files a DeepSpeed tutorial descriptor lists: {"type": "Megatron", "version": v,
    "checkpoints": [rank 0 file, rank 1 file, ...]} (paths relative to `base`); `version` is
    the checkpoint_version of files that do not store one."""
    names = desc.get("checkpoints")
    names = [names] if isinstance(names, str) else list(names or [])
    if not names:
        raise CheckpointError(f"{base}: the Megatron descriptor lists no 'checkpoints'; list "
                              "the mp_rank model files in TP rank order")
    pool, row = _Pool(), []
    for name in names:
        path = Path(base) / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the descriptor but missing; copy it or fix "
                                  "the descriptor's 'checkpoints' list")
        row.append(pool.open(path))
    folder = Path(names[0]).parent.parent.name
    iteration = "release" if folder == "release" else row[0].iteration
    return _build([row], options, iteration, default_version=desc.get("version"))


def _build(stages: List[List[_RankFile]], options: ReadOptions, iteration,
           default_version, source: Optional[dict] = None) -> Checkpoint:
    """`source` given (megatron_dist: one already merged "rank file"; megatron_ds_pipe: one
    file per TP rank holding every stage's layers): not checked against the args' TP x PP."""
    first = stages[0][0]
    args = first.args
    _check_args(args, first.path)
    tp, pp = len(stages[0]), len(stages)
    want = (_arg(args, "tensor_model_parallel_size", tp),
            _arg(args, "pipeline_model_parallel_size", pp))
    if source is None and want != (tp, pp):
        raise CheckpointError(f"{first.path}: its args say TP {want[0]} x PP {want[1]} but {tp} x "
                              f"{pp} rank files were given; list every rank's file in rank order")
    version = _version(stages, default_version)
    roles, layers = _collect(stages)
    spec = _spec(args, roles, version, options, first.path)
    _check_complete(roles, layers, spec, stages)
    if spec.tied:
        roles.pop("head.weight", None)  # the last stage's copy of the embedding (PP > 1)
    family = _family(spec, options.arch, first.path)
    source = {**(source or {"format": "megatron", "tp_size": tp, "pp_size": pp}),
              "checkpoint_version": version, "iteration": iteration}
    return Checkpoint(format="megatron", config=family.config(spec),
                      tensors=_refs(roles, spec, family), extra_files={}, source=source)


def _check_complete(roles: Dict[str, Pieces], layers: int, s: _Spec, stages):
    last = stages[-1][0].path
    if layers != s.layers:
        raise CheckpointError(f"{last}: the rank files hold {layers} layers but the args say "
                              f"num_layers={s.layers}; copy every pipeline stage's mp_rank folders")
    if s.version < 2.0 and s.groups != s.heads:
        raise CheckpointError(f"{last}: checkpoint_version {s.version} predates query groups but "
                              "the args use group_query_attention; the version or args are wrong")
    for role in ("lnf.weight",) + (() if s.tied else ("head.weight",)):
        if role not in roles:
            what = "final norm" if role == "lnf.weight" else "output_layer.weight (untied LM head)"
            raise CheckpointError(f"{last}: no {what} in the last pipeline stage; copy every "
                                  "mp_rank folder of the checkpoint")
