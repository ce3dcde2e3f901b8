"""The `checkpoint.json` descriptors of the DeepSpeed-Inference tutorial, and DeepSpeed's own
ds_inference_config.json given as a file:

    {"type": "Megatron", "version": 0.0, "checkpoints": ["mp_rank_00/model_optim_rng.pt", ...]}
    {"type": "BLOOM", "version": 1.0, "checkpoints": ["model-00001-of-00072.safetensors", ...]}
    {"type": "ds_model", "version": 1.0, "checkpoints": "path/to/deepspeed/save_dir"}
    {"type": "ds_model", "version": 1.0, "checkpoints": {"non_tp": [...], "tp": [...]}, ...}

Paths are relative to the json's folder. Each (type, shape of "checkpoints") pair is handled by
one reader module's function `f(desc, base, options) -> Checkpoint`, imported when needed.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from . import ReadOptions
from .checkpoint import Checkpoint
from .errors import CheckpointError, read_json_object

MAX_BYTES = 1 << 20  # a descriptor is a few lines; anything bigger is some other json

# "type" (lower case) -> {shape of "checkpoints": (module, function)}
SHAPES = {"list": "path or list of paths", "dict": "{non_tp, tp} dict"}
HANDLERS = {
    "megatron": {"list": ("megatron", "read_descriptor")},
    "ds_model": {"list": ("deepspeed", "read_descriptor"),
                 "dict": ("ds_inference", "read_config_json")},
    # DeepSpeed's save_mp_checkpoint_path names BLOOM models' pre-sharded saves "bloom" too
    "bloom": {"list": ("hf", "read_descriptor"),
              "dict": ("ds_inference", "read_config_json")},
}


def sniff(path: Path) -> bool:
    path = Path(path)
    if not (path.is_file() and path.suffix == ".json") or path.stat().st_size > MAX_BYTES:
        return False
    try:
        desc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, OSError, RecursionError):
        return False
    return isinstance(desc, dict) and "type" in desc and "checkpoints" in desc


def read(path: Path, options: ReadOptions) -> Checkpoint:
    """Read the checkpoint a descriptor json describes."""
    path = Path(path)
    desc = read_json_object(path, "a checkpoint descriptor", "fix the descriptor")
    if "type" not in desc or "checkpoints" not in desc:
        raise CheckpointError(f"{path}: not a checkpoint descriptor (needs 'type' and "
                              "'checkpoints'); see the DeepSpeed-Inference tutorial's format")
    check_fields(desc, path)
    module, function = handler(desc, path)
    reader = getattr(importlib.import_module(f"{__package__}.{module}"), function)
    return reader(desc, path.parent, options)


def _paths(v) -> bool:
    return isinstance(v, list) and all(isinstance(p, str) and p for p in v)


def _number(v) -> bool:
    if isinstance(v, str):
        try:
            float(v)
            return True
        except ValueError:
            return False
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


# field -> (test of its value, what it must be): the fields readers use, checked before any
# reader sees them (a wrong type is then a clear error, never a crash inside a reader)
FIELDS = {
    "type": (lambda v: isinstance(v, str), "a name (Megatron, ds_model or BLOOM)"),
    "checkpoints": (lambda v: (isinstance(v, str) and v) or _paths(v) or (
        isinstance(v, dict) and all(v.get(k) is None or _paths(v[k]) for k in ("non_tp", "tp"))),
        "a path, a list of paths, or {\"non_tp\": [paths], \"tp\": [paths]}"),
    "version": (_number, "a number"),
    "base_dir": (lambda v: v is None or isinstance(v, str), "a path"),
    "tp_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                "a positive integer"),
    "parallelization": (lambda v: isinstance(v, str), "a name ('tp')"),
    "dtype": (lambda v: v is None or isinstance(v, str), "a dtype name"),
}


def check_fields(desc: dict, path: Path) -> None:
    """Raises a CheckpointError naming the first field of the wrong type or value."""
    for key, (ok, what) in FIELDS.items():
        if key in desc and not ok(desc[key]):
            value = repr(desc[key])
            value = value if len(value) <= 60 else value[:57] + "..."
            raise CheckpointError(f"{path}: '{key}' is {value}; it must be {what} (fix the "
                                  "descriptor)")


def handler(desc: dict, path: Path):
    """(module, function) that reads this descriptor."""
    kind = str(desc["type"]).lower()
    if kind not in HANDLERS:
        raise CheckpointError(f"{path}: unknown descriptor type {desc['type']!r}; known: "
                              f"{', '.join(HANDLERS)}")
    shape = "dict" if isinstance(desc["checkpoints"], dict) else "list"
    if shape not in HANDLERS[kind]:
        want = " or ".join(SHAPES[s] for s in HANDLERS[kind])
        raise CheckpointError(f"{path}: a {desc['type']} descriptor's 'checkpoints' must be a "
                              f"{want}, not a {SHAPES[shape]}; fix the descriptor")
    return HANDLERS[kind][shape]
