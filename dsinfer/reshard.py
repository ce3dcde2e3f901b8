"""Re-shard a checkpoint of any supported format to TP degree N, streaming tensor by tensor."""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from dsinfer import specs
from dsinfer.formats import CheckpointError, ReadOptions, open_checkpoint
from dsinfer.formats import dsinfer_format, hf
from dsinfer.formats.atomic import AtomicDir
from dsinfer.formats.safetensors_io import sha256_file

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TARGETS = ("dsinfer", "hf")


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


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in DTYPES:
        raise CheckpointError(f"unknown --dtype '{name}'; choose one of float32, float16, bfloat16")
    return DTYPES[name]


def reshard(src, out, tp: int, to: str = "dsinfer", dtype: Optional[str] = None,
            fmt: Optional[str] = None, arch: Optional[str] = None,
            vocab_size: Optional[int] = None, force: bool = False, progress: bool = True,
            max_part_bytes: int = dsinfer_format.MAX_PART_BYTES) -> Result:
    """Reads `src` (any registered format), writes it split `tp` ways into `out` (dsinfer
    format) or as an HF folder (`to="hf"`, tp 1). Atomic: `out` appears complete or not at all."""
    start = time.perf_counter()
    src, out = Path(src), Path(out)
    if to not in TARGETS:
        raise CheckpointError(f"unknown --to '{to}'; choose one of {', '.join(TARGETS)}")
    if tp < 1:
        raise CheckpointError(f"--tp must be >= 1 (got {tp})")
    if to == "hf" and tp != 1:
        raise CheckpointError("--to hf writes a single unsharded folder: use --tp 1 (or --to "
                              "dsinfer for a pre-sharded output)")
    out_dtype = parse_dtype(dtype)
    guard = AtomicDir(out, force, protect=[src])  # refuses an existing --out before any work
    ckpt = open_checkpoint(src, fmt, ReadOptions(arch=arch, vocab_size=vocab_size))
    spec = specs.for_config(ckpt.config, fallback=arch)
    placements, styles = specs.plan(spec, ckpt.config, ckpt.tensors, tp)
    architecture = ckpt.architecture if ckpt.config.get("architectures") else spec.architectures[0]
    with guard as tmp:
        if to == "hf":
            files = hf.write(tmp, ckpt, out_dtype, progress=progress)
            _copy_extra(ckpt, tmp, skip=("config.json",))
            files.update(_hash_small_files(tmp, files))
        else:
            manifest = dsinfer_format.write(tmp, ckpt, tp, placements, styles, architecture,
                                            out_dtype, max_part_bytes=max_part_bytes,
                                            progress=progress)
            _copy_extra(ckpt, tmp)
            if not (tmp / "config.json").exists():
                hf._write_config(tmp, ckpt.config, None)
            dsinfer_format.finish(tmp, manifest)
            files = manifest["files"]
    return Result(out, to, tp, architecture, files, time.perf_counter() - start)


def _copy_extra(ckpt, tmp: Path, skip=()) -> None:
    for rel, path in ckpt.extra_files.items():
        if rel not in skip:
            shutil.copyfile(path, tmp / rel)


def _hash_small_files(tmp: Path, known: dict) -> dict:
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in tmp.iterdir() if p.is_file() and p.name not in known}
