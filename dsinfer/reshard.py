"""Re-shard a checkpoint of any supported format to TP degree N, streaming tensor by tensor.

Two paths write the same bytes. Where no dtype changes and the source is an HF safetensors or
a dsinfer folder, `formats.bytecopy` copies byte ranges of the source files (torch is never
imported: it costs more than the copy). Everything else (pickled, Megatron and DeepSpeed
sources, dtype casts, quantization) goes through the tensor readers and writers.
"""
from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple, Union

from dsinfer import specs
from dsinfer.formats import Checkpoint, CheckpointError, ReadOptions, open_checkpoint
from dsinfer.formats import bytecopy, dsinfer_format, hf
from dsinfer.formats.atomic import AtomicDir
from dsinfer.formats.safetensors_io import sha256_file

if TYPE_CHECKING:
    import torch

# --dtype names -> torch dtype names (DTYPES, the torch dtypes, is built on first use)
DTYPE_NAMES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16",
               "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
TARGETS = ("dsinfer", "hf")


def __getattr__(name: str):
    if name == "DTYPES":  # {--dtype name: torch dtype}; importing this module stays torch-free
        import torch
        globals()["DTYPES"] = {k: getattr(torch, v) for k, v in DTYPE_NAMES.items()}
        return globals()["DTYPES"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        check_dtype(self.dtype)


def check_dtype(name: Optional[str]) -> Optional[str]:
    """The torch dtype name of a --dtype value (None stays None); a clear error otherwise."""
    if name is not None and name not in DTYPE_NAMES:
        raise CheckpointError(f"unknown --dtype '{name}'; choose one of float32, float16, bfloat16")
    return None if name is None else DTYPE_NAMES[name]


def parse_dtype(name: Optional[str]) -> Optional["torch.dtype"]:
    if check_dtype(name) is None:
        return None
    return __getattr__("DTYPES")[name]


def open_source(src, fmt: Optional[str] = None, arch: Optional[str] = None,
                vocab_size: Optional[int] = None) -> Tuple[Checkpoint, specs.ArchSpec]:
    ckpt = open_checkpoint(Path(src), fmt, ReadOptions(arch=arch, vocab_size=vocab_size))
    spec = specs.for_config(ckpt.config, fallback=arch)
    specs.check_fits(spec, (t.name for t in ckpt.tensors), src)
    specs.check_layers(spec, ckpt.tensors, ckpt.config, src)
    return ckpt, spec


def write(ckpt: Union[Checkpoint, bytecopy.ByteCheckpoint], spec: specs.ArchSpec, target: Target,
          src: Path, quantization: Optional[dict] = None, extra: Optional[Dict[str, dict]] = None,
          check: Optional[Callable[[], None]] = None) -> Result:
    """Plans the TP split of `ckpt` and writes it to `target.out` atomically. A ByteCheckpoint
    is written by byte copies (and its source hashes checked); `check()`, when given, runs
    last before the output is committed (raising leaves no output)."""
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
            files = _write_hf(tmp, ckpt, target)
            _copy_extra(ckpt, tmp, skip=("config.json",))
            files.update(_hash_small_files(tmp, files))
        else:
            if isinstance(ckpt, bytecopy.ByteCheckpoint):
                manifest = _write_dsinfer_bytes(tmp, ckpt, target, placements, styles,
                                                architecture, quantization, extra)
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
        if check is not None:
            check()
    return Result(Path(target.out), target.to, target.tp, architecture, files,
                  time.perf_counter() - start)


def reshard(src, out, tp: int, to: str = "dsinfer", dtype: Optional[str] = None,
            fmt: Optional[str] = None, arch: Optional[str] = None,
            vocab_size: Optional[int] = None, force: bool = False, progress: bool = True,
            max_part_bytes: int = dsinfer_format.MAX_PART_BYTES, fast: bool = True) -> Result:
    """Reads `src` (any registered format), writes it split `tp` ways into `out` (dsinfer
    format) or as an HF folder (`to="hf"`, tp 1). Atomic: `out` appears complete or not at
    all. An int8 dsinfer source stays int8: its tensors and scales are split or merged as is.
    A dsinfer source's files are checked against its manifest's sha256 (CheckpointError naming
    the file, and no output, if one differs). `fast=False` forces the tensor path."""
    target = Target(Path(out), tp, to, dtype, force, progress, max_part_bytes)
    target.check()
    if arch is not None:
        specs.get(arch)              # unknown --arch: an error even where the config says
    AtomicDir(target.out, force, protect=[src])  # refuse an existing --out before reading
    ckpt = bytecopy.open_source(Path(src), fmt) if fast else None
    if ckpt is not None and _casts(ckpt, target.dtype):
        ckpt = None
    if ckpt is not None:
        spec = specs.for_config(ckpt.config, fallback=arch)
        specs.check_fits(spec, (t.name for t in ckpt.tensors), src)
        specs.check_layers(spec, ckpt.tensors, ckpt.config, src)
        placements, _ = specs.plan(spec, ckpt.config, ckpt.tensors, target.tp)
        if not all(bytecopy.supported(placements[t.name], t.shape) for t in ckpt.tensors):
            ckpt = None
    if ckpt is None:
        ckpt, spec = open_source(src, fmt, arch, vocab_size)
    m = ckpt.manifest or {}
    extra = {n: {k: i[k] for k in CARRIED_KEYS if k in i} for n, i in m.get("tensors", {}).items()}
    if isinstance(ckpt, bytecopy.ByteCheckpoint) or ckpt.format != dsinfer_format.FORMAT:
        return write(ckpt, spec, target, Path(src), m.get("quantization"), extra)
    with _SourceCheck(bytecopy.source_hashes(*dsinfer_format.load_manifest(src))) as check:
        return write(ckpt, spec, target, Path(src), m.get("quantization"), extra, check.wait)


def _casts(ckpt: bytecopy.ByteCheckpoint, dtype: Optional[str]) -> bool:
    """--dtype changes some floating tensor (so bytes cannot be copied as they are)."""
    name = check_dtype(dtype)
    return name is not None and any(t.is_floating_point and t.dtype_name != name
                                    for t in ckpt.tensors)


class _SourceCheck:
    """Hashes a dsinfer source's files against its manifest on a helper thread while the
    tensor path converts; `wait()` (before the commit) raises if one differs."""

    def __init__(self, hashes: Dict[Path, str]):
        self.stop, self.error = threading.Event(), None
        self.thread = threading.Thread(target=self._run, args=(hashes,), daemon=True)

    def _run(self, hashes) -> None:
        try:
            bytecopy.check_files(hashes, self.stop, threads=1)
        except BaseException as e:  # re-raised by wait() in the caller's thread
            self.error = e

    def __enter__(self) -> "_SourceCheck":
        self.thread.start()
        return self

    def wait(self) -> None:
        self.thread.join()
        if self.error is not None and not isinstance(self.error, bytecopy._Stopped):
            raise self.error

    def __exit__(self, *exc) -> bool:
        self.stop.set()
        self.thread.join()
        return False


def _write_hf(tmp: Path, ckpt, target: Target) -> Dict[str, dict]:
    if not isinstance(ckpt, bytecopy.ByteCheckpoint):
        return hf.write(tmp, ckpt, parse_dtype(target.dtype), progress=target.progress)
    out, shards = bytecopy.hf_files(ckpt, hf.MAX_SHARD_BYTES)
    files = bytecopy.write_files(tmp, out, ckpt.hashes, target.progress, "write hf")
    hf.write_index(tmp, [f.rel for f in out], shards, files)
    hf.write_config(tmp, ckpt.config, check_dtype(target.dtype))
    return files


def _write_dsinfer_bytes(tmp: Path, ckpt: bytecopy.ByteCheckpoint, target: Target, placements,
                         styles, architecture, quantization, extra) -> dict:
    """dsinfer_format.write's output, by byte copies (no cast: dtypes stay the source's)."""
    out, parts = bytecopy.dsinfer_files(ckpt, target.tp, placements, target.max_part_bytes)
    for r in range(target.tp):
        (tmp / dsinfer_format.rank_dir(r, target.tp)).mkdir()
    files = bytecopy.write_files(tmp, out, ckpt.hashes, target.progress,
                                 f"write tp={target.tp}")
    names = {t.name: t.dtype_name for t in ckpt.tensors}
    main = dsinfer_format.main_dtype((t.dtype_name, t.is_floating_point, t.nbytes)
                                     for t in ckpt.tensors)
    return dsinfer_format.new_manifest(ckpt, target.tp, placements, styles, parts, names,
                                       architecture, quantization, extra, files, main)


def _copy_extra(ckpt, tmp: Path, skip=()) -> None:
    for rel, path in ckpt.extra_files.items():
        if rel not in skip:
            shutil.copyfile(path, tmp / rel)


def _hash_small_files(tmp: Path, known: dict) -> dict:
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in tmp.iterdir() if p.is_file() and p.name not in known}
