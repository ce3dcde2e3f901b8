"""DeepSpeed universal checkpoints (`python -m deepspeed.checkpoint.ds_to_universal`), read
without importing DeepSpeed.

    ROOT/latest_universal             text: the universal folder's name (beside `latest`)
    ROOT/TAG/zero/<param>/fp32.pt     one parameter's fp32 master, whole:
        ZeRO 1-2: {"param": tensor in the parameter's shape, "cat_dim", ...}: the TP slices
                  merged (along cat_dim; a SwiGLU fc1's gate and up halves each merged on
                  their own), TP-replicated ones taken from rank 0, Megatron's vocabulary
                  padding cut off
        ZeRO-3:   the bare tensor, flat; its shape is in the model states' param_shapes
    ROOT/TAG/zero/<param>/{exp_avg,exp_avg_sq,step}.pt, ROOT/TAG/zero/optimizer_state.pt
                                      optimizer state: not read
    ROOT/TAG/mp_rank_XX_model_states.pt (ZeRO 1-2) or zero_pp_rank_R_mp_rank_00_model_states.pt
                                      (ZeRO-3): the source tag's model states, copied: module
                                      buffers, param_shapes, shared_params, Megatron's args

For ZeRO 1-2 the converter also writes fp32.pt for module entries without optimizer state
(buffers, frozen and tied parameters): `float()` copies of the fp16/bf16 module tensors, not
masters. A buffer is therefore read from the module in its own dtype, a frozen parameter from
its fragments, and a tied alias (GPT-2's lm_head) stays tied to the parameter that owns it.

Two kinds of model, told apart by the model states:
- a model trained with DeepSpeed directly: the names are the module's, as formats/deepspeed.py
  reads them; the model's config.json sits in the universal folder, ROOT or ROOT's parent;
- Megatron-DeepSpeed (Megatron's args in the model states): GPTModel's names (language_model.*)
  or GPTModelPipe's (tied_modules.embed.*, <spec index>.*), presented to formats/megatron.py as
  one TP-1 rank file (megatron_ds_pipe classifies the pipeline's spec layers).
Reading opens each fp32.pt for its shape only (memory-mapped); a tensor's data is read when it
is loaded.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from . import ReadOptions, deepspeed, megatron, megatron_ds_pipe
from .checkpoint import Checkpoint, TensorRef, find_extra_files
from .errors import CheckpointError, read_tag_file
from .safe_pickle import load_pt

TAG_FILE = "latest_universal"
ZERO = "zero"
FP32 = "fp32.pt"
PIPE_NAME = re.compile(r"(?:tied_modules\.(\w+)|(\d+))\.(.+)")   # GPTModelPipe's parameters
RERUN = "run deepspeed.checkpoint.ds_to_universal again or copy the whole folder it wrote"


def sniff(path: Path) -> bool:
    """A universal folder, or a save folder whose `latest_universal` is what is left: DeepSpeed's
    own `latest`, where its tag still exists, is the source the universal folder was made from
    and is read first (by the deepspeed or megatron reader)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if _is_universal(path):
        return True
    if not (path / TAG_FILE).is_file():
        return False
    source = path / deepspeed.TAG_FILE
    try:
        tag = read_tag_file(source, "") if source.is_file() else ""
    except CheckpointError:            # an unreadable `latest` names no source tag
        tag = ""
    return not (tag and "/" not in tag and (path / tag).is_dir())


def _is_universal(folder: Path) -> bool:
    zero = folder / ZERO
    return zero.is_dir() and any((p / FP32).is_file() for p in zero.iterdir())


def read(path: Path, options: ReadOptions) -> Checkpoint:
    tag = _tag_folder(Path(path))
    files = _states_files(tag)
    header = load_pt(files[0])
    params = _params(tag)
    if deepspeed._megatron_args(header):
        return _read_megatron(tag, files[0], header, params, options)
    return _read_module(tag, files, header, params)


# ---- locating files --------------------------------------------------------------------------

def _tag_folder(path: Path) -> Path:
    """A universal folder itself, or the one ROOT/latest_universal names."""
    if _is_universal(path):
        return path
    latest = path / TAG_FILE
    if not latest.is_file():
        raise CheckpointError(f"{path}: not a DeepSpeed universal checkpoint (no {ZERO}/<param>/"
                              f"{FP32} and no {TAG_FILE}); pass the folder ds_to_universal wrote")
    name = read_tag_file(latest, "write the universal folder's name (e.g. "
                         "global_step100_universal) into it")
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise CheckpointError(f"{latest}: holds {name!r}, not a folder name; write the universal "
                              "folder's name (e.g. global_step100_universal) into it")
    tag = path / name
    if not tag.is_dir():
        raise CheckpointError(f"{latest}: names '{name}' but {tag} is missing; copy that folder "
                              f"or fix {TAG_FILE}")
    if not _is_universal(tag):
        raise CheckpointError(f"{tag}: no {ZERO}/<param>/{FP32} files; the conversion did not "
                              f"finish: {RERUN}")
    return tag


def _states_files(tag: Path) -> List[Path]:
    """mp_rank_00_model_states.pt (ZeRO 1-2; other TP ranks' copies add nothing), else every
    zero_pp_rank_R_mp_rank_00_model_states.pt found (ZeRO-3: frozen parameters are cut across
    them; _read_module checks their number against the data-parallel size). Files of other TP
    ranks (mp_rank_01, ...) are copies the merged weights do not need."""
    names = {p.name: p for p in tag.iterdir()}
    mp = sorted(n for n in names if deepspeed.MODEL_FILE.fullmatch(n))
    if mp:
        return [names[mp[0]]]
    ranks = {int(m[1]): names[n] for n in names for m in [deepspeed.ZERO_FILE.fullmatch(n)]
             if m and m[3] == "model" and int(m[2]) == 0}
    if not ranks:
        raise CheckpointError(f"{tag}: no mp_rank_00_model_states.pt (or zero_pp_rank_*_mp_rank_"
                              "00_model_states.pt), which ds_to_universal copies from the source "
                              "tag; copy it from there")
    for r in range(max(ranks) + 1):
        if r not in ranks:
            _missing_rank(tag, r)
    return [ranks[r] for r in sorted(ranks)]


def _missing_rank(tag: Path, r: int):
    raise CheckpointError(f"{tag / f'zero_pp_rank_{r}_mp_rank_00_model_states.pt'}: missing; "
                          "copy every data-parallel rank's model states from the source tag")


def _params(tag: Path) -> Dict[str, Path]:
    """Parameter name -> its fp32.pt, in name order."""
    out = {}
    for folder in sorted(p for p in (tag / ZERO).iterdir() if p.is_dir()):
        if not (folder / FP32).is_file():
            raise CheckpointError(f"{folder / FP32}: missing, so parameter '{folder.name}' has "
                                  f"no weights; {RERUN}")
        out[folder.name] = folder / FP32
    return out


def _tensor(path: Path, shape: Optional[tuple]) -> torch.Tensor:
    """One fp32.pt's tensor (memory-mapped): `param` of the ZeRO 1-2 dict, or ZeRO-3's bare
    tensor, viewed in `shape` (the model states' param_shapes) when stored flat."""
    obj = load_pt(path)
    t = obj.get("param") if isinstance(obj, dict) else obj
    if not isinstance(t, torch.Tensor):
        what = f"a dict with keys {sorted(map(str, obj))[:4]}" if isinstance(obj, dict) \
            else f"a {type(obj).__name__}"
        raise CheckpointError(f"{path}: holds {what}, not a parameter (a tensor, or a dict with "
                              f"'param'); the file is damaged or not ds_to_universal's: {RERUN}")
    if isinstance(obj, torch.Tensor) and shape is not None and t.dim() == 1 \
            and tuple(t.shape) != tuple(shape):
        if t.numel() != math.prod(shape):
            raise CheckpointError(f"{path}: {t.numel()} values, but the model states give the "
                                  f"parameter the shape {list(shape)}; {RERUN}")
        t = t.view(shape)
    return t


def _ref(name: str, path: Path, shape: Optional[tuple]) -> TensorRef:
    t = _tensor(path, shape)
    return TensorRef(name, tuple(t.shape), t.dtype,
                     load=lambda p=path, s=shape: _tensor(p, s).clone())


# ---- a model trained with DeepSpeed directly -------------------------------------------------

def _read_module(tag: Path, files: List[Path], header: dict, params: Dict[str, Path]
                 ) -> Checkpoint:
    zero3 = deepspeed.ZERO_FILE.fullmatch(files[0].name) is not None
    if zero3 and len(files) < (header.get("dp_world_size") or 1):
        _missing_rank(tag, len(files))
    meta = deepspeed._meta(files, {files[0]: header}, merged=True)
    if params and all(n.startswith("module.") for n in params):   # a wrapped model's names
        params = {n[len("module."):]: p for n, p in params.items()}
    stage = 3 if zero3 else deepspeed._stage(meta, None)
    trained = {n: s for group in meta.param_shapes for n, s in group.items()}
    weights: Dict[str, TensorRef] = {}
    for name, shape in trained.items():
        if name not in params:
            raise CheckpointError(f"{tag / ZERO / name / FP32}: missing; the model states list "
                                  f"'{name}' as a trained parameter: {RERUN}")
        weights[name] = _ref(name, params[name], shape if zero3 else None)
    weights.update(deepspeed._buffer_refs(meta))
    weights.update(deepspeed._frozen_refs(meta, stage))
    groups = deepspeed._storage_groups(meta.module)
    for name, path in params.items():   # module entries the converter copied as float()
        owners = [meta.shared.get(name), *groups.get(name, ())]
        if name not in weights and not any(o in weights for o in owners if o != name):
            weights[name] = _ref(name, path, None)
    tensors, tied = deepspeed._ordered(meta, weights)
    config, config_dir = deepspeed.locate_config([tag, tag.parent, tag.parent.parent], tag)
    source = {"format": "ds_universal", "tp_size": 1, "zero_stage": stage, "tag": tag.name,
              "dp_world_size": meta.sd.get("dp_world_size"), "weights": "fp32_master"}
    if tied:
        source["tied"] = tied
    return Checkpoint("ds_universal", config, tensors, find_extra_files(config_dir), source)


# ---- Megatron-DeepSpeed ----------------------------------------------------------------------

class UniversalRank(megatron.RankFileBase):
    """megatron.py's rank-file interface over the whole (TP-merged) universal folder."""

    def __init__(self, tag: Path, path: Path, header: dict, params: Dict[str, Path]):
        self.path = path
        self.args = header.get("args")
        self.version = header.get("checkpoint_version")
        self.iteration = header.get("iteration")
        self.mappable = True
        shapes = {n: tuple(s) for group in header.get("param_shapes") or [] for n, s in
                  group.items()}
        params = {n: p for n, p in params.items() if not megatron.SKIP.fullmatch(n)}
        self._files = {native: (params[name], shapes.get(name))
                       for native, name in _native_names(tag / ZERO, params, self.args).items()}
        self.shapes = {}
        for native, (p, shape) in self._files.items():
            t = _tensor(p, shape)
            self.shapes[native] = (tuple(t.shape), t.dtype)

    def tensor(self, name: str) -> torch.Tensor:
        return _tensor(*self._files[name])        # one file per tensor: nothing is held


def _native_names(zero: Path, params: Dict[str, Path], args) -> Dict[str, str]:
    """Native legacy name -> universal name. GPTModel's names are native already; GPTModelPipe's
    (<spec index>.<key>, tied_modules.<key>.<key>) go through megatron_ds_pipe's spec-layer
    classification, a tied module counting as a layer before the first (the embedding)."""
    if not any(PIPE_NAME.fullmatch(n) for n in params):
        return {n: n for n in params}
    keys: Dict[int, List[str]] = {}
    prefix: Dict[int, str] = {}
    tied: List[str] = []
    for name in params:
        m = PIPE_NAME.fullmatch(name)
        if m is None:
            raise CheckpointError(f"{zero / name}: a parameter outside GPTModelPipe's layers "
                                  "(<layer>.*, tied_modules.embed.*) in a pipeline model's "
                                  f"universal folder; {megatron_ds_pipe.CONVERTER}")
        if m[1] is not None and m[1] not in tied:
            tied.append(m[1])
        idx = -1 - tied.index(m[1]) if m[1] is not None else int(m[2])
        prefix[idx] = f"tied_modules.{m[1]}" if m[1] is not None else m[2]
        keys.setdefault(idx, []).append(m[3])
    natives = megatron_ds_pipe.native_names(
        keys, args, lambda idx: zero / f"{prefix.get(idx, idx)}.*",
        f"{zero}: no transformer block parameters (<layer>.input_layernorm.weight, ...)",
        "parameter folder")
    return {native: f"{prefix[idx]}.{key}" for native, (idx, key) in natives.items()}


def _read_megatron(tag: Path, path: Path, header: dict, params: Dict[str, Path],
                   options: ReadOptions) -> Checkpoint:
    rank = UniversalRank(tag, path, header, params)
    trained: Tuple[int, int] = (megatron._arg(rank.args, "tensor_model_parallel_size", 1),
                                megatron._arg(rank.args, "pipeline_model_parallel_size", 1))
    source = {"format": "megatron", "layout": "deepspeed universal", "tp_size": 1, "pp_size": 1,
              "trained_tp_pp": list(trained)}
    return megatron._build([[rank]], options, rank.iteration, default_version=None,
                           source=source)
