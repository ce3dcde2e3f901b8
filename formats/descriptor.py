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
from .errors import CheckpointError

MAX_BYTES = 1 << 20  # a descriptor is a few lines; anything bigger is some other json

# "type" (lower case) -> {shape of "checkpoints": (module, function)}
SHAPES = {"list": "path or list of paths", "dict": "{non_tp, tp} dict"}
HANDLERS = {
    "megatron": {"list": ("megatron", "read_descriptor")},
    "ds_model": {"list": ("deepspeed", "read_descriptor"),
                 "dict": ("ds_inference", "read_config_json")},
    "bloom": {"list": ("hf", "read_descriptor")},
}


def sniff(path: Path) -> bool:
    path = Path(path)
    if not (path.is_file() and path.suffix == ".json") or path.stat().st_size > MAX_BYTES:
        return False
    try:
        desc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, OSError):
        return False
    return isinstance(desc, dict) and "type" in desc and "checkpoints" in desc


def read(path: Path, options: ReadOptions) -> Checkpoint:
    """Read the checkpoint a descriptor json describes."""
    path = Path(path)
    try:
        desc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); fix the descriptor") from None
    if not isinstance(desc, dict) or "type" not in desc or "checkpoints" not in desc:
        raise CheckpointError(f"{path}: not a checkpoint descriptor (needs 'type' and "
                              "'checkpoints'); see the DeepSpeed-Inference tutorial's format")
    module, function = handler(desc, path)
    reader = getattr(importlib.import_module(f"{__package__}.{module}"), function)
    return reader(desc, path.parent, options)


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
