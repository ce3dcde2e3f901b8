"""The hub of the converter: every reader yields a `Checkpoint` of lazily loaded tensors with
canonical (HF transformers) names; every writer consumes one."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

from .errors import CheckpointError, read_json_object

if TYPE_CHECKING:  # torch is imported lazily (the byte-copy fast path never needs it)
    import torch


@dataclasses.dataclass
class TensorRef:
    """One canonical tensor, not yet loaded.

    `load()` returns the full (TP-merged, canonical-layout) tensor on CPU; calling it twice
    reads twice, so a writer calls it once and lets the result go.
    `load_rows(start, stop)` optionally returns rows [start, stop) of dim 0 without reading
    the rest, as a list of pieces whose dim-0 concatenation is those rows (a reader sets it
    where its storage allows; None otherwise). Writers write the pieces one after another.
    """

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    load_rows: Optional[Callable[[int, int], List[torch.Tensor]]] = None

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * dtype_size(self.dtype)


@dataclasses.dataclass
class Checkpoint:
    """What a reader returns.

    format: registry name of the reader ("hf", "megatron", ...).
    config: the HF `config.json` contents for the model (readers of non-HF formats build it).
    tensors: canonical tensors in a stable order (the order of the source where it has one).
    extra_files: files to copy verbatim next to the output (tokenizer files), relname -> path.
    source: small dict describing the origin for the manifest (format, tp_size, ...); never
        absolute paths.
    """

    format: str
    config: dict
    tensors: List[TensorRef]
    extra_files: Dict[str, Path] = dataclasses.field(default_factory=dict)
    source: dict = dataclasses.field(default_factory=dict)
    manifest: Optional[dict] = None  # set by the dsinfer reader: the source's own manifest

    @property
    def architecture(self) -> str:
        return config_architecture(self.config)

    def by_name(self) -> Dict[str, TensorRef]:
        return {t.name: t for t in self.tensors}


def dtype_size(dtype: "torch.dtype") -> int:
    return dtype.itemsize


# Files copied verbatim from a source folder next to the output (config, tokenizers,
# generation config). Writers that must change config.json (HF output with a new dtype) rewrite it.
EXTRA_FILE_NAMES = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "added_tokens.json",
    "generation_config.json", "chat_template.jinja", "chat_template.json",
)


def find_extra_files(folder: Path) -> Dict[str, Path]:
    return {n: folder / n for n in EXTRA_FILE_NAMES if (folder / n).is_file()}


def load_config(path: Path) -> dict:
    """An HF config.json: a JSON object whose 'architectures' is a list of class names and
    'model_type' a name (readers and specs rely on both). FileNotFoundError propagates."""
    config = read_json_object(path, "a model config object", "copy the model's config.json again")
    archs, kind = config.get("architectures"), config.get("model_type")
    if archs is not None and not (isinstance(archs, list)
                                  and all(isinstance(a, str) for a in archs)):
        raise CheckpointError(f"{path}: 'architectures' is {str(archs)[:60]!r}, not a list of "
                              "class names; fix config.json")
    if kind is not None and not isinstance(kind, str):
        raise CheckpointError(f"{path}: 'model_type' is {str(kind)[:60]!r}, not a name; fix "
                              "config.json")
    return config


def config_architecture(config: dict) -> str:
    """The HF class name a config.json names first (`architectures`)."""
    archs = config.get("architectures") or []
    if not archs:
        raise ValueError("config has no 'architectures' entry")
    return archs[0]
