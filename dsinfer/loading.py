"""Where a rank's weights come from: this rank's slice of every checkpoint tensor, at the
runtime TP degree, read without touching other ranks' data whenever the checkpoint allows."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from dsinfer import specs
from dsinfer.log import warn
from dsinfer.formats import CheckpointError, Placement, ReadOptions, open_checkpoint
from dsinfer.formats import dsinfer_format
from dsinfer.formats.bulk_read import DeviceRead
from dsinfer.formats.layout import shard



class RankSource:
    """names: checkpoint tensor names; placement(name), style(name); get(name) -> this rank's
    slice (CPU). Pre-sharded dsinfer checkpoints at the same TP read only this rank's files."""

    def __init__(self, placements: Dict[str, Placement], styles: Dict[str, str], getter,
                 shapes: Dict[str, Tuple[int, ...]], config: dict,
                 quantization: Optional[dict] = None, architecture: Optional[str] = None):
        self.placements, self.styles, self._get = placements, styles, getter
        self.shapes, self.config, self.quantization = shapes, config, quantization
        self.architecture = architecture
        self.reading = None     # formats.bulk_read.DeviceRead of a GPU fast path (its stats)

    @property
    def names(self):
        return self.placements.keys()

    def get(self, name: str) -> torch.Tensor:
        return self._get(name)


def from_presharded(path: Path, rank: int, device=None) -> RankSource:
    """A dsinfer checkpoint whose TP equals the world size: rank r opens rank r's files only.
    On a GPU the rank's files go to device memory in one overlapped pass (formats.bulk_read)."""
    root, manifest = dsinfer_format.load_manifest(path)
    files = dsinfer_format.RankFiles(root, manifest)
    tensors = manifest["tensors"]
    placements = {n: Placement.from_json(i) for n, i in tensors.items()}
    styles = {n: i.get("style", "replicate") for n, i in tensors.items()}
    config = dsinfer_format.read_config(root)
    getter = lambda n: files.read(n, rank)  # noqa: E731
    reading = None
    if device is not None and torch.device(device).type == "cuda":
        # started now, waited for at the first tensor asked for: what the caller does in
        # between (NCCL set-up) overlaps the reads
        reading = DeviceRead([f.path for f in files.rank_files(rank)], device)

        def getter(n):
            loaded = reading.result()
            return loaded.pop(n) if n in loaded else files.read(n, rank)
    source = RankSource(placements, styles, getter,
                        {n: tuple(i["shape"]) for n, i in tensors.items()}, config,
                        manifest.get("quantization"), manifest.get("architecture"))
    source.reading = reading
    return source


def from_checkpoint(ckpt, spec, tp: int, rank: int) -> RankSource:
    """Any readable checkpoint: each tensor is loaded whole and sliced for this rank."""
    placements, styles = specs.plan(spec, ckpt.config, ckpt.tensors, tp)
    refs = ckpt.by_name()
    quant = (ckpt.manifest or {}).get("quantization")
    return RankSource(placements, styles,
                      lambda n: shard(refs[n].load(), placements[n], tp, rank).contiguous(),
                      {n: tuple(r.shape) for n, r in refs.items()}, ckpt.config, quant,
                      (ckpt.config.get("architectures") or [None])[0])


def verify_files(path: Path, tp: int, rank: int, quantization=None) -> None:
    """init_inference(verify=True): the sizes and sha256 of the files this rank will read (its
    own when pre-sharded at this TP, else all) and their tensor headers, against the manifest."""
    if not dsinfer_format.sniff(path):
        warn("dsinfer: verify=True: %s is not a dsinfer checkpoint and has no checksums; "
             "only its reader's checks apply", path)
        return
    _, manifest = dsinfer_format.load_manifest(path)
    own = manifest["tp_size"] == tp and quantization is None
    problems = dsinfer_format.verify(path, ranks=[rank] if own else None)
    if problems:  # the most specific first: one that names a tensor
        first = next((p for p in problems if "tensor '" in p), problems[0])
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{first}{more}; the checkpoint is damaged: copy it again "
                              "or re-run dsinfer-reshard (dsinfer-inspect --verify lists all)")


def open_rank_source(path, spec, tp: int, rank: int, quantization=None, device=None,
                     verify: bool = False, vocab_size: Optional[int] = None) -> RankSource:
    """Chooses the fast path (pre-sharded, same TP) or the general one, with a warning.
    vocab_size: the model's; a Megatron source's padding rows past it are dropped (Megatron
    pads the vocabulary to a multiple of 128 x TP; the model's config names the real size)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file or directory")
    if verify:
        verify_files(path, tp, rank, quantization)
    if dsinfer_format.sniff(path) and quantization is not None:
        _, manifest = dsinfer_format.load_manifest(path)
        if manifest.get("quantization"):   # already int8: use its groups, keep the fast path
            warn("dsinfer: %s is already int8 (%s); ignoring quantization_setting / dtype=int8",
                 path, manifest["quantization"].get("groups"))
            quantization = None
    if dsinfer_format.sniff(path) and quantization is None:
        _, manifest = dsinfer_format.load_manifest(path)
        if manifest["tp_size"] == tp:
            return from_presharded(path, rank, device)
        warn("dsinfer: checkpoint %s is sharded for TP %d, running TP %d: re-sharding "
                    "at load (pre-shard with `dsinfer-reshard --tp %d` to load faster)",
                    path, manifest["tp_size"], tp, tp)
    elif tp > 1 or quantization is not None:
        warn("dsinfer: %s is not pre-sharded for TP %d: every rank reads the full "
                    "tensors (pre-shard with `dsinfer-reshard`/`dsinfer-quantize --tp %d` to "
                    "load faster)", path, tp, tp)
    ckpt = open_checkpoint(path, options=ReadOptions(vocab_size=vocab_size))
    if quantization is not None:
        from dsinfer.quantize import quantized_view
        ckpt, _ = quantized_view(ckpt, spec, quantization, {})
    return from_checkpoint(ckpt, spec, tp, rank)


def from_state_dict(state: Dict[str, torch.Tensor], config: dict, spec, tp: int,
                    rank: int) -> RankSource:
    """A model that already holds its full weights (no checkpoint given)."""
    from dsinfer.formats import Checkpoint, TensorRef
    refs = [TensorRef(n, tuple(t.shape), t.dtype, load=lambda t=t: t) for n, t in state.items()]
    return from_checkpoint(Checkpoint("model", config, refs), spec, tp, rank)
