"""DeepSpeed training checkpoints (`engine.save_checkpoint`), read without importing DeepSpeed.

    SAVE_DIR/latest                       text: the tag of the newest checkpoint ("global_step1")
    SAVE_DIR/TAG/mp_rank_00_model_states.pt
        {"module": state dict (fp16/bf16 under mixed precision; EMPTY (0,) tensors under ZeRO-3),
         "param_shapes": [{name: Size}] one dict per optimizer param group, in flat order,
         "buffer_names", "shared_params" {alias: target}, "frozen_param_shapes",
         "frozen_param_fragments", "dp_world_size", "mp_world_size", "ds_config", ...}
    SAVE_DIR/TAG/[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt   one per data-parallel rank R
        {"optimizer_state_dict": {"zero_stage", "partition_count",
            ZeRO-1/2: "single_partition_of_fp32_groups": [flat fp32 per group], "group_paddings",
                      "param_alignment_paddings"
            ZeRO-3:   "fp32_flat_groups": [flat fp32 per sub-group]}}
    ZeRO-3 keeps the model states per rank too: TAG/zero_pp_rank_R_mp_rank_00_model_states.pt.

The fp32 master weights are rebuilt as DeepSpeed's `zero_to_fp32.py` does (layouts at
`_zero12_refs` and `_zero3_refs`), one parameter at a time from memory-mapped partitions.
Without optimizer partitions (ZeRO-0) the weights are the module's own tensors: DeepSpeed's
FP16_Optimizer keeps fp32 masters in `optimizer.fp32_groups`, but what the model ran with (and
what DeepSpeed reloads with `load_optimizer_states=False`) is the fp16 module; its masters round
to it exactly, and the fixtures' references are it.
Tied parameters (`shared_params`, or module entries sharing one storage) are emitted once, under
the name that owns the weights; the aliases are listed in `source["tied"]`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import ReadOptions
from .checkpoint import Checkpoint, TensorRef, find_extra_files, load_config
from .errors import CheckpointError, read_tag_file
from .safe_pickle import load_pt

TAG_FILE = "latest"
MODEL_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt")
ZERO_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(optim|model)_states\.pt")
PIPE_FILE = re.compile(r"layer_\d+-model_(?:\d+-)?states\.pt")


def sniff(path: Path) -> bool:
    path = Path(path)
    if path.is_file():
        return bool(MODEL_FILE.fullmatch(path.name) or ZERO_FILE.fullmatch(path.name))
    if not path.is_dir():
        return False
    if (path / TAG_FILE).is_file():
        return True
    return any(MODEL_FILE.fullmatch(p.name) or ZERO_FILE.fullmatch(p.name) for p in path.iterdir())


def read(path: Path, options: ReadOptions) -> Checkpoint:
    """Read a DeepSpeed save folder (with `latest`), a tag folder, or a model-states file in it."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    tag_dir = _tag_folder(folder)
    loaded = _rank0_states(tag_dir)
    if any(_megatron_args(sd) for sd in loaded.values()):  # Megatron-DeepSpeed: Megatron's
        from . import megatron                              # model dict inside
        return megatron.read(tag_dir, options)
    return _read_tag(tag_dir, [tag_dir, tag_dir.parent, folder, folder.parent], loaded)


def _rank0_states(tag_dir: Path) -> Dict[Path, Any]:
    """{path: unpickled} of the tag's first mp_rank_XX_model_states.pt ({} without one): read
    once, for the Megatron check and then the reader."""
    files = sorted(p for p in tag_dir.iterdir() if MODEL_FILE.fullmatch(p.name))
    return {files[0]: load_pt(files[0])} if files else {}


def _megatron_args(state: Any) -> bool:
    """Whether model states carry Megatron's training args (Megatron-DeepSpeed saves them as
    client state; an HF model trained with DeepSpeed does not)."""
    args = state.get("args") if isinstance(state, dict) else None
    return all(hasattr(args, a) for a in ("num_layers", "hidden_size", "num_attention_heads"))


def read_descriptor(desc: dict, base: Path, options: ReadOptions) -> Checkpoint:
    """Tutorial descriptor {"type": "ds_model", "checkpoints": "save/or/tag/folder" (or a list of
    files inside one tag folder), "version": 1.0}; paths relative to `base` (the json's folder)."""
    names = desc.get("checkpoints")
    names = [names] if isinstance(names, str) else list(names or [])
    if not names:
        raise CheckpointError(f"{base}: the ds_model descriptor lists no 'checkpoints'; give the "
                              "DeepSpeed save folder (the one holding 'latest')")
    paths = [Path(base) / n for n in names]
    for p in paths:
        if not p.exists():
            raise CheckpointError(f"{p}: listed in the descriptor but missing; copy it or fix "
                                  "the descriptor's 'checkpoints'")
    folders = {p.parent if p.is_file() else p for p in paths}
    if len(folders) != 1:
        raise CheckpointError(f"{base}: the ds_model descriptor lists files of several folders "
                              f"({', '.join(sorted(map(str, folders)))}); list one tag folder")
    folder = folders.pop()
    tag_dir = _tag_folder(folder)
    return _read_tag(tag_dir, [tag_dir, tag_dir.parent, folder, folder.parent, Path(base)])


def locate_config(folders: Sequence[Path], what: Path) -> Tuple[dict, Path]:
    """The HF config.json of the first of `folders` that has one, and that folder."""
    for folder in dict.fromkeys(Path(f) for f in folders):
        path = folder / "config.json"
        if path.is_file():
            return load_config(path), folder
    raise CheckpointError(f"{what}: no config.json next to the checkpoint (looked in "
                          f"{', '.join(str(f) for f in dict.fromkeys(folders))}); put the "
                          "model's HF config.json next to it")


# ---- locating files --------------------------------------------------------------------------

def _tag_folder(folder: Path) -> Path:
    """SAVE_DIR (with `latest`) -> SAVE_DIR/TAG; a folder holding model states is the tag."""
    latest = folder / TAG_FILE
    if latest.is_file():
        tag = read_tag_file(latest, "write the tag folder's name (e.g. global_step100) into it")
        if not tag or "/" in tag or "\\" in tag or tag in (".", ".."):
            raise CheckpointError(f"{latest}: holds {tag!r}, not a checkpoint tag; write the tag "
                                  "folder's name (e.g. global_step100) into it")
        if not (folder / tag).is_dir():
            raise CheckpointError(f"{latest}: points at tag '{tag}' but {folder / tag} is "
                                  "missing; copy that folder or fix 'latest'")
        return folder / tag
    if any(MODEL_FILE.fullmatch(p.name) or ZERO_FILE.fullmatch(p.name) for p in folder.iterdir()):
        return folder
    steps = sorted(p.name for p in folder.iterdir() if p.is_dir())
    raise CheckpointError(f"{folder}: no '{TAG_FILE}' file and no *_model_states.pt; pass the tag "
                          f"folder itself (one of: {', '.join(steps) or 'none found'})")


def _rank_files(folder: Path, kind: str, world: Optional[int] = None) -> List[Path]:
    """zero_pp_rank_R_mp_rank_00_{kind}_states.pt for R = 0..n-1 in rank order, n = `world` or
    the highest rank found + 1; [] when there are none at all."""
    found: Dict[int, Path] = {}
    for p in folder.iterdir():
        m = ZERO_FILE.fullmatch(p.name)
        if m and m.group(3) == kind:
            if int(m.group(2)) != 0:
                _tp_error(p)
            found[int(m.group(1))] = p
    if not found:
        return []
    for r in range(max(world or 0, max(found) + 1)):
        if r not in found:
            raise CheckpointError(f"{folder / f'zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt'}: "
                                  "missing ZeRO partition file; copy every rank's file of the tag")
    return [found[r] for r in sorted(found)]


def _tp_error(path: Path):
    raise CheckpointError(f"{path}: this DeepSpeed checkpoint was trained with tensor (model) "
                          "parallelism; merging its mp_rank shards needs the model's TP plan: "
                          "for Megatron-DeepSpeed read it with --from megatron, otherwise merge "
                          "them with the training code and read the HF result")


def _model_states_files(tag_dir: Path) -> List[Path]:
    """mp_rank_00_model_states.pt (ZeRO 0-2), else every zero_pp_rank_R model states (ZeRO-3)."""
    names = [p.name for p in tag_dir.iterdir()]
    pipe = next((n for n in names if PIPE_FILE.fullmatch(n)), None)
    if pipe:
        raise CheckpointError(f"{tag_dir / pipe}: DeepSpeed pipeline-parallel checkpoints (layer_* "
                              "files) are not supported; export the model's state dict to HF")
    mp = sorted(n for n in names if MODEL_FILE.fullmatch(n))
    if any(n != "mp_rank_00_model_states.pt" for n in mp):
        _tp_error(tag_dir / mp[-1])
    if mp:
        return [tag_dir / mp[0]]
    files = _rank_files(tag_dir, "model")
    if not files:
        raise CheckpointError(f"{tag_dir}: no mp_rank_00_model_states.pt or zero_pp_rank_*_"
                              "model_states.pt; copy the complete tag folder")
    return files


# ---- model states ----------------------------------------------------------------------------

@dataclasses.dataclass
class _Meta:
    path: Path                               # the model-states file (rank 0)
    module: Dict[str, torch.Tensor]          # names without a wrapper's `module.` prefix
    param_shapes: List[Dict[str, tuple]]     # per param group, in flat-buffer order
    buffers: List[str]
    shared: Dict[str, str]                   # alias -> name owning the weights
    frozen_shapes: Dict[str, tuple]
    frozen: List[Dict[str, torch.Tensor]]    # frozen_param_fragments per model-states file
    sd: dict


def _load_states(path: Path, loaded: Optional[Dict[Path, Any]] = None,
                 merged: bool = False) -> dict:
    """merged: the weights come from elsewhere, already TP-merged (a universal checkpoint), so
    a TP rank's model states are fine."""
    sd = loaded[path] if loaded and path in loaded else load_pt(path)
    if not isinstance(sd, dict) or not isinstance(sd.get("module"), dict):
        raise CheckpointError(f"{path}: not a DeepSpeed model-states file (no 'module' state "
                              "dict); point dsinfer at the save folder holding 'latest'")
    if (sd.get("mp_world_size") or 1) > 1 and not merged:
        _tp_error(path)
    return sd


def _meta(paths: List[Path], loaded: Optional[Dict[Path, Any]] = None,
          merged: bool = False) -> _Meta:
    sds = [_load_states(p, loaded, merged) for p in paths]
    sd = sds[0]
    # a model wrapped in another module saves every name with a `module.` prefix
    wrapped = bool(sd["module"]) and all(k.startswith("module.") for k in sd["module"])
    fix = (lambda n: n[len("module."):] if n.startswith("module.") else n) if wrapped else str
    shared = sd.get("shared_params") or {}  # {alias: target}; older DeepSpeed: [[alias, target]]
    shared = shared.items() if isinstance(shared, dict) else shared

    def names(d) -> dict:
        return {fix(k): v for k, v in (d or {}).items()}
    return _Meta(
        path=paths[0],
        module={k: v for k, v in names(sd["module"]).items() if isinstance(v, torch.Tensor)},
        param_shapes=[{k: tuple(v) for k, v in names(g).items()}
                      for g in sd.get("param_shapes") or []],
        buffers=[fix(n) for n in sd.get("buffer_names") or []],
        shared={fix(a): fix(t) for a, t in shared},
        frozen_shapes={k: tuple(v) for k, v in names(sd.get("frozen_param_shapes")).items()},
        frozen=[names(s.get("frozen_param_fragments")) for s in sds],
        sd=sd)


def _stage(meta: _Meta, optim: Optional[dict]) -> int:
    stage = (optim or {}).get("zero_stage")
    try:  # ZeroStageEnum(2) pickles as an inert stand-in holding its value
        return int(getattr(stage, "value", stage))
    except (TypeError, ValueError, AttributeError, IndexError):
        config = (meta.sd.get("ds_config") or {}).get("zero_optimization") or {}
        return int(config.get("stage", 0))


# ---- assembling the checkpoint ---------------------------------------------------------------

def _read_tag(tag_dir: Path, config_dirs: List[Path],
              loaded: Optional[Dict[Path, Any]] = None) -> Checkpoint:
    """loaded: model-states files already unpickled ({path: object}), not read again."""
    model_files = _model_states_files(tag_dir)
    meta = _meta(model_files, loaded)
    optim_files = _rank_files(tag_dir, "optim", meta.sd.get("dp_world_size"))
    if ZERO_FILE.fullmatch(model_files[0].name):  # ZeRO-3: one model-states file per rank too
        _rank_files(tag_dir, "model", len(optim_files))
    if optim_files:
        weights, stage, kind = _master_refs(meta, optim_files)
    else:
        weights, stage, kind = _module_refs(meta), _stage(meta, None), "module"
        if stage == 3:
            raise CheckpointError(f"{tag_dir}: ZeRO-3 checkpoint without zero_pp_rank_*_optim_"
                                  "states.pt files (its weights live only there); copy them too")
    tensors, tied = _ordered(meta, weights)
    config, config_dir = locate_config(config_dirs, tag_dir)
    source = {"format": "deepspeed", "tp_size": 1, "zero_stage": stage, "tag": tag_dir.name,
              "dp_world_size": meta.sd.get("dp_world_size") or max(len(optim_files), 1),
              "weights": kind}
    if tied:
        source["tied"] = tied
    return Checkpoint("deepspeed", config, tensors, find_extra_files(config_dir), source)


def _master_refs(meta: _Meta, files: List[Path]) -> Tuple[Dict[str, TensorRef], int, str]:
    """fp32 masters rebuilt from the ZeRO partitions, plus buffers and frozen params."""
    optims = [_optim_state(p) for p in files]
    stage = _stage(meta, optims[0])
    _check_world(meta, optims, files)
    key = next((k for k in FLAT_LAYOUTS if k in optims[0]), None)
    if key is None:
        raise CheckpointError(f"{files[0]}: no fp32 partitions ({' or '.join(FLAT_LAYOUTS)}); "
                              "copy the complete checkpoint")
    weights = FLAT_LAYOUTS[key](meta, optims, files)
    weights.update(_buffer_refs(meta))
    weights.update(_frozen_refs(meta, stage))
    return weights, stage, "fp32_master"


def _ordered(meta: _Meta, weights: Dict[str, TensorRef]) -> Tuple[List[TensorRef], Dict[str, str]]:
    """The tensors in the module's order; module entries without weights of their own must be
    aliases of one that has them (shared_params, or the same storage)."""
    groups = _storage_groups(meta.module)
    out, tied = [], {}
    for name in list(meta.module) + [n for n in weights if n not in meta.module]:
        if name in weights:
            out.append(weights[name])
            continue
        owner = meta.shared.get(name)
        owner = owner if owner in weights else next(
            (n for n in groups.get(name, ()) if n in weights), None)
        if owner is None:
            raise CheckpointError(f"{meta.path}: module tensor '{name}' is in no ZeRO partition, "
                                  "buffer_names or shared_params; the checkpoint is incomplete: "
                                  "save it again with the whole model")
        tied[name] = owner
    return out, tied


def _storage_groups(module: Dict[str, torch.Tensor]) -> Dict[str, List[str]]:
    """name -> every module name viewing the same storage the same way (tied params). Keyed on
    the storage object itself (`_cdata`): empty ZeRO-3 placeholders all have data_ptr 0."""
    by_key: Dict[tuple, List[str]] = {}
    for name, t in module.items():
        key = (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), t.stride())
        by_key.setdefault(key, []).append(name)
    return {n: names for names in by_key.values() for n in names}


def _module_refs(meta: _Meta) -> Dict[str, TensorRef]:
    """ZeRO-0 (or no optimizer saved): the module's tensors, one per storage."""
    groups = _storage_groups(meta.module)
    return {n: _ref(n, t) for n, t in meta.module.items() if groups[n][0] == n}


def _buffer_refs(meta: _Meta) -> Dict[str, TensorRef]:
    for n in meta.buffers:
        if n not in meta.module:
            raise CheckpointError(f"{meta.path}: buffer '{n}' listed in buffer_names is not in "
                                  "'module'; the file is incomplete: save it again")
    return {n: _ref(n, meta.module[n]) for n in meta.buffers}


def _ref(name: str, t: torch.Tensor) -> TensorRef:
    return TensorRef(name, tuple(t.shape), t.dtype, load=lambda t=t: t.clone())


def _frozen_refs(meta: _Meta, stage: int) -> Dict[str, TensorRef]:
    """Frozen (requires_grad=False) params: whole in rank 0's fragments (ZeRO-1/2), or cut in
    ceil(numel / world) pieces, one per rank's model states (ZeRO-3)."""
    refs = {}
    for name, shape in meta.frozen_shapes.items():
        frags = meta.frozen if stage == 3 else meta.frozen[:1]
        if any(name not in f for f in frags):
            raise CheckpointError(f"{meta.path}: frozen param '{name}' has no fragment in "
                                  "frozen_param_fragments; copy every rank's model states")
        pieces = [f[name] for f in frags]
        refs[name] = TensorRef(name, shape, pieces[0].dtype, load=lambda p=pieces, s=shape:
                               torch.cat([x.reshape(-1) for x in p])[:math.prod(s)].view(s))
    return refs


# ---- optimizer partitions --------------------------------------------------------------------

def _optim_state(path: Path) -> dict:
    sd = load_pt(path)
    osd = sd.get("optimizer_state_dict") if isinstance(sd, dict) else None
    if not isinstance(osd, dict):
        raise CheckpointError(f"{path}: not a DeepSpeed ZeRO optimizer file (no "
                              "optimizer_state_dict); copy it again from the training run")
    return osd


def _check_world(meta: _Meta, optims: List[dict], files: List[Path]) -> None:
    """Every rank's partition_count, and the model states' dp_world_size, must equal the number
    of partition files found."""
    n = len(files)
    for path, osd in zip(files, optims):
        count = osd.get("partition_count", n)
        counts = set(count) if isinstance(count, (list, tuple)) else {count}
        if counts != {n}:
            raise CheckpointError(f"{path}: written for {sorted(counts)} data-parallel partitions "
                                  f"but {n} partition files are in {path.parent}; copy exactly "
                                  "the files of one training run")
    dp = meta.sd.get("dp_world_size")
    if dp is not None and dp != n:
        raise CheckpointError(f"{meta.path}: dp_world_size is {dp} but {n} ZeRO partition files "
                              f"are in {files[0].parent}; copy every rank's file of the tag")


def _views(parts: Sequence[torch.Tensor], start: int, length: int) -> List[torch.Tensor]:
    """Views of elements [start, start + length) of torch.cat(parts), without building it."""
    out, base = [], 0
    for p in parts:
        lo, hi = max(start, base), min(start + length, base + p.numel())
        if lo < hi:
            out.append(p.reshape(-1)[lo - base:hi - base])
        base += p.numel()
    return out


def _zero12_refs(meta: _Meta, optims: List[dict], files: List[Path]) -> Dict[str, TensorRef]:
    """ZeRO-1/2: per param group g, the ranks' `single_partition_of_fp32_groups[g]` laid end to
    end form one flat fp32 vector [p0 | pad0 | p1 | pad1 | ... | group padding]; param i takes
    numel(i) elements, then `param_alignment_paddings[g][i]` (0 in older DeepSpeed) are skipped;
    the group padding sits at the end of the last rank's partition."""
    key = "single_partition_of_fp32_groups"
    if len(meta.param_shapes) != len(optims[0][key]):
        raise CheckpointError(f"{files[0]}: {len(optims[0][key])} fp32 param groups but "
                              f"{meta.path.name} lists {len(meta.param_shapes)}; the files are "
                              "from different runs")
    refs = {}
    for g, shapes in enumerate(meta.param_shapes):
        parts = [osd[key][g] for osd in optims]  # rank order = flat order
        pads = (optims[0].get("param_alignment_paddings") or [[]] * (g + 1))[g] or []
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            n = math.prod(shape)
            refs[name] = _flat_ref(name, shape, parts[0].dtype,
                                   lambda p=parts, o=offset, n=n: _views(p, o, n))
            offset += n + (pads[i] if i < len(pads) else 0)
        _check_consumed(offset, parts, sum(osd.get("group_paddings", [0] * (g + 1))[g]
                                           for osd in optims), files[0], g)
    return refs


def _check_consumed(used: int, parts, padding: int, path: Path, g: int) -> None:
    avail = sum(p.numel() for p in parts)
    # lean partitions (padding dropped) hold exactly `used`; padded ones `used + padding`
    if used not in (avail, avail - padding):
        raise CheckpointError(f"{path}: param group {g} needs {used} fp32 elements but the "
                              f"partitions hold {avail} (padding {padding}); the model states and "
                              "optimizer files are from different runs")


def _zero3_refs(meta: _Meta, optims: List[dict], files: List[Path]) -> Dict[str, TensorRef]:
    """ZeRO-3: every param is cut on its own into `world` pieces of ceil(numel / world) elements
    (the last one zero-padded); rank r's flat fp32 vector (its `fp32_flat_groups` end to end)
    holds piece r of each param, params in param_shapes order (all groups concatenated)."""
    world = len(optims)
    flats = [list(osd["fp32_flat_groups"]) for osd in optims]
    sizes = {sum(t.numel() for t in f) for f in flats}
    if len(sizes) != 1:
        raise CheckpointError(f"{files[0].parent}: ZeRO-3 ranks hold different amounts of fp32 "
                              "weights; the partition files are from different runs")
    dtype = flats[0][0].dtype if flats[0] else torch.float32
    refs, offset = {}, 0
    for shapes in meta.param_shapes:
        for name, shape in shapes.items():
            piece = math.ceil(math.prod(shape) / world)
            refs[name] = _flat_ref(name, shape, dtype, lambda o=offset, k=piece: [
                v for f in flats for v in _views(f, o, k)])
            offset += piece
    have = sizes.pop()
    if offset != have:
        raise CheckpointError(f"{files[0]}: param_shapes need {offset} fp32 elements per rank but "
                              f"each rank holds {have}; the model states and optimizer files are "
                              "from different runs")
    return refs


def _flat_ref(name: str, shape: tuple, dtype: torch.dtype, views) -> TensorRef:
    """A param whose elements are `views()` end to end, then padding (cut off here)."""
    n = math.prod(shape)
    empty = [torch.empty(0, dtype=dtype)]  # a param of 0 elements has no views
    return TensorRef(name, tuple(shape), dtype,
                     load=lambda: torch.cat(views() or empty)[:n].view(shape))


# optimizer-state key of the flat fp32 partitions -> how params are laid out in them
FLAT_LAYOUTS = {
    "single_partition_of_fp32_groups": _zero12_refs,   # ZeRO-1/2 (and bf16 ZeRO-0)
    "fp32_flat_groups": _zero3_refs,                   # ZeRO-3
}
