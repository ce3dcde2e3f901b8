"""Re-shard a checkpoint of any supported format to TP degree N, streaming tensor by tensor."""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from dsinfer import specs
from dsinfer.formats import Checkpoint, CheckpointError, ReadOptions, open_checkpoint
from dsinfer.formats import dsinfer_format, hf
from dsinfer.formats.atomic import AtomicDir
from dsinfer.formats.safetensors_io import sha256_file

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TARGETS = ("dsinfer", "hf")
# Per-tensor manifest keys that describe the data itself and travel with it through reshards.
CARRIED_KEYS = ("quant",)


@dataclasses.dataclass
class Result:
    out: Path
    to: str
    tp: int
    architecture: str
    files: dict        # relpath -> {"bytes", "sha256"}
    seconds: float

    @property
    def bytes(self) -> int:
        return sum(f["bytes"] for f in self.files.values())


@dataclasses.dataclass
class Target:
    """Where and how to write: shared by reshard and quantize."""
    out: Path
    tp: int
    to: str = "dsinfer"
    dtype: Optional[str] = None
    force: bool = False
    progress: bool = True
    max_part_bytes: int = dsinfer_format.MAX_PART_BYTES

    def check(self) -> None:
        if self.to not in TARGETS:
            raise CheckpointError(f"unknown --to '{self.to}'; choose one of {', '.join(TARGETS)}")
        if self.tp < 1:
            raise CheckpointError(f"--tp must be >= 1 (got {self.tp})")
        if self.to == "hf" and self.tp != 1:
            raise CheckpointError("--to hf writes a single unsharded folder: use --tp 1 (or "
                                  "--to dsinfer for a pre-sharded output)")
        parse_dtype(self.dtype)


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in DTYPES:
        raise CheckpointError(f"unknown --dtype '{name}'; choose one of float32, float16, bfloat16")
    return DTYPES[name]


def open_source(src, fmt: Optional[str] = None, arch: Optional[str] = None,
                vocab_size: Optional[int] = None) -> Tuple[Checkpoint, specs.ArchSpec]:
    ckpt = open_checkpoint(Path(src), fmt, ReadOptions(arch=arch, vocab_size=vocab_size))
    spec = specs.for_config(ckpt.config, fallback=arch)
    specs.check_fits(spec, (t.name for t in ckpt.tensors), src)
    return ckpt, spec


def write(ckpt: Checkpoint, spec: specs.ArchSpec, target: Target, src: Path,
          quantization: Optional[dict] = None, extra: Optional[Dict[str, dict]] = None) -> Result:
    """Plans the TP split of `ckpt` and writes it to `target.out` atomically."""
    start = time.perf_counter()
    target.check()
    guard = AtomicDir(Path(target.out), target.force, protect=[src])
    placements, styles = specs.plan(spec, ckpt.config, ckpt.tensors, target.tp)
    architecture = ckpt.architecture if ckpt.config.get("architectures") else spec.architectures[0]
    if quantization and target.to == "hf":
        raise CheckpointError("an int8 checkpoint can only be written in the dsinfer format "
                              "(drop --to hf)")
    scales = {t.name for t in ckpt.tensors if styles[t.name] == "scale"}
    with guard as tmp:
        if target.to == "hf":
            files = hf.write(tmp, ckpt, parse_dtype(target.dtype), progress=target.progress)
            _copy_extra(ckpt, tmp, skip=("config.json",))
            files.update(_hash_small_files(tmp, files))
        else:
            manifest = dsinfer_format.write(
                tmp, ckpt, target.tp, placements, styles, architecture,
                parse_dtype(target.dtype), quantization=quantization, keep_dtype=scales,
                extra=extra, max_part_bytes=target.max_part_bytes, progress=target.progress)
            _copy_extra(ckpt, tmp)
            if not (tmp / "config.json").exists():
                hf.write_config(tmp, ckpt.config, None)
            dsinfer_format.finish(tmp, manifest)
            files = manifest["files"]
    return Result(Path(target.out), target.to, target.tp, architecture, files,
                  time.perf_counter() - start)


def reshard(src, out, tp: int, to: str = "dsinfer", dtype: Optional[str] = None,
            fmt: Optional[str] = None, arch: Optional[str] = None,
            vocab_size: Optional[int] = None, force: bool = False, progress: bool = True,
            max_part_bytes: int = dsinfer_format.MAX_PART_BYTES) -> Result:
    """Reads `src` (any registered format), writes it split `tp` ways into `out` (dsinfer
    format) or as an HF folder (`to="hf"`, tp 1). Atomic: `out` appears complete or not at
    all. An int8 dsinfer source stays int8: its tensors and scales are split or merged as is."""
    target = Target(Path(out), tp, to, dtype, force, progress, max_part_bytes)
    target.check()
    AtomicDir(target.out, force, protect=[src])  # refuse an existing --out before reading
    ckpt, spec = open_source(src, fmt, arch, vocab_size)
    m = ckpt.manifest or {}
    extra = {n: {k: i[k] for k in CARRIED_KEYS if k in i} for n, i in m.get("tensors", {}).items()}
    return write(ckpt, spec, target, Path(src), m.get("quantization"), extra)


def _copy_extra(ckpt, tmp: Path, skip=()) -> None:
    for rel, path in ckpt.extra_files.items():
        if rel not in skip:
            shutil.copyfile(path, tmp / rel)


def _hash_small_files(tmp: Path, known: dict) -> dict:
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in tmp.iterdir() if p.is_file() and p.name not in known}
