"""Megatron-DeepSpeed pipeline checkpoints (DeepSpeed's PipelineModule) -> formats/megatron.py.

With pipeline parallelism (Megatron-DeepSpeed's default: GPTModelPipe) DeepSpeed's engine saves
every layer of the model's spec list in a file of its own, per TP rank:
    ROOT/latest, ROOT/latest_checkpointed_iteration.txt     as for the plain layout
    ROOT/global_stepN/mp_rank_{tp:02d}_model_states.pt      {"module": None, DeepSpeed's entries,
                                         Megatron's client state: args, checkpoint_version, ...}
    ROOT/global_stepN/layer_{idx:02d}-model_{tp:02d}-model_states.pt   one spec layer's state dict
`idx` is the layer's place in the spec list, which also holds parameter-free entries (dtype
casts, transposes) whose number differs between Megatron-DeepSpeed versions (BigScience's
starts the blocks at 3, microsoft's at 2), so files are told apart by their keys:
    (nothing)   a parameter-free module's empty state dict: skipped
    embedding   word_embeddings.weight [, position_embeddings.weight]   (EmbeddingPipe)
    block       input_layernorm.*, self_attention.*, post_attention_layernorm.*, mlp.*
    final norm  weight [, bias]                                        (LayerNorm / RMSNorm)
    LM head     lm_head.weight     (LMHeadPipe, --untie-embeddings-and-output-weights)
The tied LM head (TiedLayerSpec with a forward_fn) is not saved again; an embedding file after
the blocks, where a DeepSpeed version does save it, is read as the head's copy and dropped.

Each TP rank becomes one legacy rank file (megatron.py's interface: path, args, version,
iteration, shapes, tensor, meta, release) whose native names are the nested legacy ones
(language_model.embedding.*, language_model.encoder.layers.N.*, ...), so TP merging, the
argument checks and the HF families are megatron.py's. Layer files are memory-mapped; nothing
is read until a tensor is loaded.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import megatron   # megatron.py imports this module only inside read()
from .errors import CheckpointError
from .safe_pickle import load_pt

LAYER_FILE = re.compile(r"layer_(\d+)-model_(?:(\d+)-)?model_states\.pt")
ARGS_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt")
BLOCK_KEY = re.compile(r"(?:input_layernorm|self_attention|attention|post_attention_layernorm|"
                       r"mlp)\..+")
CONVERTER = ("convert it with Megatron-DeepSpeed's tools/convert_checkpoint/"
             "deepspeed_to_megatron.py, then read the result")


def is_pipe_folder(folder: Path) -> bool:
    return folder.is_dir() and any(LAYER_FILE.fullmatch(p.name) for p in folder.iterdir())


# ---- which spec layer a file holds -------------------------------------------------------------
# kind -> (does a key set belong to it, native name of a key); checked in this order

def _is_empty(keys) -> bool:     # a parameter-free module DeepSpeed saved anyway
    return not keys


def _is_embedding(keys) -> bool:
    return "word_embeddings.weight" in keys


def _is_head(keys) -> bool:
    return keys == {"lm_head.weight"}


def _is_final_norm(keys) -> bool:
    return bool(keys) and keys <= {"weight", "bias"}


def _is_block(keys) -> bool:
    return bool(keys) and all(BLOCK_KEY.fullmatch(k) for k in keys)


KINDS = (("empty", _is_empty), ("embedding", _is_embedding), ("head", _is_head),
         ("final_norm", _is_final_norm), ("block", _is_block))
NATIVE = {  # kind -> native legacy name of one key ({L}: the block's index among the blocks)
    "embedding": lambda k, L: f"language_model.embedding.{k}",
    "head_copy": lambda k, L: ("language_model.word_embeddings_for_head.weight"
                               if k == "word_embeddings.weight" else None),
    "head": lambda k, L: "language_model.output_layer.weight",
    "final_norm": lambda k, L: f"language_model.encoder.final_layernorm.{k}",
    "block": lambda k, L: f"language_model.encoder.layers.{L}.{k}",
}


def _kind(path: Path, keys) -> str:
    for kind, belongs in KINDS:
        if belongs(keys):
            return kind
    raise CheckpointError(f"{path}: a pipeline layer with tensors {sorted(keys)[:4]}, which is "
                          "not an embedding, transformer block, final norm or LM head of a "
                          f"Megatron GPT model; {CONVERTER}")


# ---- one TP rank -------------------------------------------------------------------------------

class _LayerFile:
    """One layer_XX file: its tensors' shapes at once, the tensors on demand (memory-mapped)."""

    def __init__(self, path: Path):
        self.path = path
        state = self._load()
        self.shapes = {k: (tuple(t.shape), t.dtype) for k, t in state.items()}
        self._state: Optional[dict] = None

    def _load(self) -> Dict[str, torch.Tensor]:
        """The file's tensors, minus what megatron.py skips (rotary inv_freq buffers, TE
        `_extra_state`) and non-tensor entries."""
        state = load_pt(self.path)
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.path}: holds a {type(state).__name__}, not a layer "
                                  "state dict (name -> tensor); the file is not from a "
                                  "DeepSpeed pipeline save or is damaged")
        return {k: t for k, t in state.items()
                if isinstance(t, torch.Tensor) and not megatron.SKIP.fullmatch(str(k))}

    def tensor(self, key: str) -> torch.Tensor:
        if self._state is None:
            self._state = self._load()
        return self._state[key]

    def release(self):
        self._state = None


class PipeRank(megatron.RankFileBase):
    """megatron.py's rank-file interface over one TP rank's layer files."""

    def __init__(self, folder: Path, tp: int, files: Dict[int, Path], header: dict, pool):
        self.path, self._pool = folder, pool
        self.args = header.get("args")
        self.version = header.get("checkpoint_version")
        self.iteration = header.get("iteration")
        self.mappable = True
        layers = {idx: _LayerFile(p) for idx, p in sorted(files.items())}
        natives = native_names({idx: list(f.shapes) for idx, f in layers.items()}, self.args,
                               lambda idx: _file(folder, idx, tp),
                               f"{folder}: no transformer block files (layer_XX-model_{tp:02d}-"
                               "model_states.pt)", "layer file")
        self._where = {n: (layers[idx], key) for n, (idx, key) in natives.items()}
        self._files = list(layers.values())
        self.shapes = {n: f.shapes[k] for n, (f, k) in self._where.items()}

    def tensor(self, name: str) -> torch.Tensor:
        f, key = self._where[name]
        t = f.tensor(key)
        self._pool.note(t.numel() * t.element_size())
        return t

    def release(self):
        for f in self._files:
            f.release()


def _file(folder: Path, idx: int, tp: int) -> Path:
    return folder / f"layer_{idx:02d}-model_{tp:02d}-model_states.pt"


def native_names(keys: Dict[int, List[str]], args, where: Callable[[int], Path], no_blocks: str,
                 unit: str) -> Dict[str, Tuple[int, str]]:
    """One TP rank's spec layers {spec index: its keys} -> {native legacy name: (index, key)}.

    Layers are classified by their keys and checked in order (below); `where(index)` names a
    layer in messages, `no_blocks` starts the message for a rank without blocks and `unit`
    ("layer file", "parameter") is what a missing layer is."""
    kinds = {idx: _kind(where(idx), set(ks)) for idx, ks in sorted(keys.items())}
    blocks = _check_order(kinds, where, no_blocks, unit)
    want = megatron._arg(args, "num_layers")
    if want is not None and len(blocks) < want:
        raise CheckpointError(f"{where(blocks[-1] + 1)}: missing; the args say num_layers={want} "
                              f"but there are {len(blocks)} transformer blocks: copy every "
                              f"{unit} of the checkpoint")
    out: Dict[str, Tuple[int, str]] = {}
    for idx, kind in kinds.items():
        if kind == "embedding" and idx > blocks[-1]:
            kind = "head_copy"
        for key in keys[idx]:
            native = NATIVE[kind](key, blocks.index(idx) if kind == "block" else None)
            if native is not None:
                out[native] = (idx, key)
    return out


def _check_order(kinds: Dict[int, str], where: Callable[[int], Path], no_blocks: str,
                 unit: str) -> List[int]:
    """The blocks' spec indices, checked: one embedding before them, consecutive blocks (a gap is
    a missing layer), the final norm and an untied head after them."""
    blocks = [idx for idx, k in kinds.items() if k == "block"]
    if not blocks:
        raise CheckpointError(f"{no_blocks}; copy every {unit} of the checkpoint")
    for idx in range(blocks[0], blocks[-1] + 1):
        if idx not in kinds:
            raise CheckpointError(f"{where(idx)}: missing between the transformer blocks; copy "
                                  f"every {unit} of the checkpoint")
        if kinds[idx] not in ("block", "empty"):
            raise CheckpointError(f"{where(idx)}: a {kinds[idx].replace('_', ' ')} between "
                                  f"transformer blocks; the folder mixes checkpoints: {CONVERTER}")
    for kind, before in (("embedding", True), ("final_norm", False), ("head", False)):
        for idx in (i for i, k in kinds.items() if k == kind):
            if kind == "embedding" and idx > blocks[-1]:
                continue                                # the tied head's copy, if saved
            if (idx < blocks[0]) != before:
                raise CheckpointError(
                    f"{where(idx)}: a {kind.replace('_', ' ')} "
                    f"{'after' if not before else 'before'} the blocks is expected, not here; "
                    f"the folder mixes checkpoints: {CONVERTER}")
    return blocks


# ---- the folder --------------------------------------------------------------------------------

def _layer_files(folder: Path) -> Dict[int, Dict[int, Path]]:
    """tp rank -> spec index -> layer file."""
    found: Dict[int, Dict[int, Path]] = {}
    for p in folder.iterdir():
        m = LAYER_FILE.fullmatch(p.name)
        if m and p.is_file():
            found.setdefault(int(m[2] or 0), {})[int(m[1])] = p
    return found


def _header(folder: Path) -> Tuple[Path, dict]:
    """The lowest mp_rank_XX_model_states.pt: Megatron's args, version and iteration."""
    files = sorted((int(m[1]), p) for p in folder.iterdir()
                   for m in [ARGS_FILE.fullmatch(p.name)] if m)
    if not files:
        raise CheckpointError(f"{folder}: pipeline layer files without mp_rank_00_model_states."
                              "pt, which holds Megatron's args (the model's shape); copy it from "
                              "the checkpoint's tag folder")
    path = files[0][1]
    state = load_pt(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not DeepSpeed's model "
                              "states dict; copy it again from the checkpoint")
    return path, state


def open_folder(folder: Path, pool) -> Tuple[List["PipeRank"], dict]:
    """One PipeRank per TP rank (checked against the args' TP size), and the source record."""
    found = _layer_files(folder)
    path, header = _header(folder)
    args = header.get("args")
    tp = megatron._arg(args, "tensor_model_parallel_size", 1 + max(found))
    pp = megatron._arg(args, "pipeline_model_parallel_size", 1)
    extra = sorted(t for t in found if t >= tp)
    if extra:
        raise CheckpointError(f"{folder}: layer files of TP rank {extra[0]} but the args of "
                              f"{path.name} say TP {tp}; the folder mixes checkpoints")
    ranks = []
    for t in range(tp):
        if t not in found:
            raise CheckpointError(f"{folder}: no layer files of TP rank {t} (layer_XX-model_"
                                  f"{t:02d}-model_states.pt); the args say TP {tp}: copy every "
                                  "rank's layer files")
        if set(found[t]) != set(found[0]):
            missing = sorted(set(found[0]) ^ set(found[t]))[0]
            raise CheckpointError(f"{folder}: layer {missing:02d} exists for one TP rank but not "
                                  f"another (model_00 vs model_{t:02d}); copy every rank's layer "
                                  "files")
        ranks.append(PipeRank(folder, t, found[t], header, pool))
    source = {"format": "megatron", "layout": "megatron-deepspeed pipeline", "tp_size": tp,
              "pp_size": pp}
    return ranks, source
