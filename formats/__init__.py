"""Checkpoint readers and writers. Knows files, not models' maths.

Readers form one registry keyed by format name; each module exposes `sniff(path) -> bool` and
`read(path, options) -> Checkpoint` (canonical HF names, lazy tensors). `open_checkpoint`
detects the format from the path (first reader whose sniff says yes, in registry order) or
takes it from `fmt`.
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Optional

from .checkpoint import Checkpoint, TensorRef
from .errors import CheckpointError, UnsafePickleError
from .layout import Placement

# format name -> module (under dsinfer.formats) implementing sniff/read; order = detection order
READERS = {
    "dsinfer": "dsinfer_format",
    "descriptor": "descriptor",          # DeepSpeed tutorial checkpoint.json / ds_inference_config.json
    "ds_inference": "ds_inference",      # a folder holding ds_inference_config.json
    "ds_universal": "ds_universal",      # deepspeed.checkpoint.ds_to_universal's output
    "megatron": "megatron",
    "deepspeed": "deepspeed",
    "hf": "hf",
}


@dataclasses.dataclass
class ReadOptions:
    arch: Optional[str] = None        # override the architecture the files imply
    vocab_size: Optional[int] = None  # strip vocab padding rows down to this many (Megatron)


def _module(fmt: str):
    return importlib.import_module(f"{__name__}.{READERS[fmt]}")


def detect(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    for fmt in READERS:
        if _module(fmt).sniff(path):
            return fmt
    raise CheckpointError(
        f"{path}: not a checkpoint dsinfer recognises (looked for dsinfer.json, config.json with "
        "model weights, latest_checkpointed_iteration.txt / mp_rank_XX, a DeepSpeed 'latest' / "
        "global_stepN or 'latest_universal' / zero/<param>/fp32.pt, or a checkpoint.json "
        "descriptor); pass --from "
        f"{{{','.join(READERS)}}} to force one")


def open_checkpoint(path, fmt: Optional[str] = None, options: Optional[ReadOptions] = None
                    ) -> Checkpoint:
    path = Path(path)
    if fmt is not None and fmt not in READERS:
        raise CheckpointError(f"unknown source format '{fmt}'; known: {', '.join(READERS)}")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    fmt = fmt or detect(path)
    return _module(fmt).read(path, options or ReadOptions())


__all__ = ["Checkpoint", "TensorRef", "CheckpointError", "UnsafePickleError", "Placement",
           "ReadOptions", "READERS", "detect", "open_checkpoint"]
