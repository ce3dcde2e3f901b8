"""dsinfer's own pre-sharded format (v1): reader, writer and verifier.

    out/
      dsinfer.json                       manifest (below)
      config.json, tokenizer files       copied from the source
      rank-00-of-04/part-000.safetensors rank 0's slices, canonical names
      rank-01-of-04/part-000.safetensors ...

Manifest: {"format": "dsinfer", "format_version": 1, "architecture", "tp_size", "dtype",
"quantization": null | {...}, "source": {"format", "tp_size", ...},
"tensors": {name: {"shape": global shape, "dtype", "split_dim": 0|1|null, "style",
                   "parts": [global part sizes] (packed tensors only), "part": k}},
"files": {relpath: {"bytes", "sha256"}}}. Every rank stores replicated tensors itself, so a rank
never opens another rank's files; tensor `name` of rank r lives in rank r's part `part`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from .checkpoint import Checkpoint, TensorRef, find_extra_files
from .errors import CheckpointError
from .layout import Placement, shard, shard_rows, unshard
from .safetensors_io import SafetensorsFile, StreamingWriter, sha256_file

FORMAT = "dsinfer"
FORMAT_VERSION = 1
MANIFEST = "dsinfer.json"
MAX_PART_BYTES = 4 * 1024 ** 3


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype name '{name}' in {MANIFEST}")
    return dtype


def rank_dir(rank: int, tp: int) -> str:
    return f"rank-{rank:02d}-of-{tp:02d}"


def part_path(rank: int, tp: int, part: int) -> str:
    return f"{rank_dir(rank, tp)}/part-{part:03d}.safetensors"


# ----------------------------------------------------------------------------------- reading

def sniff(path: Path) -> bool:
    return (path / MANIFEST).is_file() if path.is_dir() else path.name == MANIFEST


def load_manifest(path: Path) -> Tuple[Path, dict]:
    """(root folder, manifest) from a dsinfer folder or its dsinfer.json."""
    path = Path(path)
    root, mpath = (path, path / MANIFEST) if path.is_dir() else (path.parent, path)
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{mpath}: missing; not a dsinfer checkpoint") from None
    except ValueError as e:
        raise CheckpointError(f"{mpath}: not valid JSON ({e}); the manifest is corrupt") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: 'format' is {manifest.get('format')!r}, not 'dsinfer'")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{mpath}: format_version {version!r} is not supported by this "
                              f"dsinfer (reads up to {FORMAT_VERSION}); upgrade dsinfer")
    for key in ("tp_size", "tensors", "files", "architecture"):
        if key not in manifest:
            raise CheckpointError(f"{mpath}: manifest has no '{key}'; the manifest is corrupt")
    return root, manifest


class RankFiles:
    """Opens each rank file at most once (header only) and checks its size against the
    manifest, which catches truncation without hashing."""

    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest, self.cache = root, manifest, {}

    def get(self, rank: int, part: int) -> SafetensorsFile:
        rel = part_path(rank, self.manifest["tp_size"], part)
        if rel not in self.cache:
            path = self.root / rel
            if not path.is_file():
                raise CheckpointError(f"{path}: rank file missing; the checkpoint is incomplete "
                                      "(copy it again or re-run dsinfer-reshard)")
            want = self.manifest["files"].get(rel, {}).get("bytes")
            if want is not None and path.stat().st_size != want:
                raise CheckpointError(f"{path}: {path.stat().st_size} bytes, manifest says "
                                      f"{want}; the file is truncated or was replaced")
            self.cache[rel] = SafetensorsFile(path)
        return self.cache[rel]

    def read(self, name: str, rank: int) -> torch.Tensor:
        f = self.get(rank, self.manifest["tensors"][name].get("part", 0))
        self.check(f, name)
        return f.read(name)

    def check(self, f: SafetensorsFile, name: str) -> None:
        """The rank file holds `name` with the shape the manifest implies for a rank."""
        info = self.manifest["tensors"][name]
        if name not in f.entries:
            raise CheckpointError(f"{f.path}: tensor '{name}' missing (the manifest lists it)")
        want = Placement.from_json(info).shard_shape(info["shape"], self.manifest["tp_size"])
        if f.shape(name) != tuple(want):
            raise CheckpointError(f"{f.path}: tensor '{name}' has shape {list(f.shape(name))}, "
                                  f"the manifest implies {list(want)} for this rank; the files "
                                  "do not belong together (re-run dsinfer-reshard)")

    def rank_files(self, rank: int) -> List[SafetensorsFile]:
        """Every part file of one rank, opened (headers) and checked against the manifest."""
        parts = sorted({i.get("part", 0) for i in self.manifest["tensors"].values()})
        files = [self.get(rank, k) for k in parts]
        for name, info in self.manifest["tensors"].items():
            self.check(files[parts.index(info.get("part", 0))], name)
        return files


def read_rank(path: Path, rank: int) -> Dict[str, torch.Tensor]:
    """Rank `rank`'s slices only, as stored: what a runtime rank loads."""
    root, manifest = load_manifest(path)
    files = RankFiles(root, manifest)
    return {name: files.read(name, rank) for name in manifest["tensors"]}


def read_config(root: Path) -> dict:
    path = root / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read(path: Path, options=None) -> Checkpoint:
    root, manifest = load_manifest(path)
    files = RankFiles(root, manifest)
    tp = manifest["tp_size"]
    tensors = []
    for name, info in manifest["tensors"].items():
        placement = Placement.from_json(info)
        load = (lambda n=name, p=placement: unshard([files.read(n, r) for r in range(tp)], p))
        tensors.append(TensorRef(name, tuple(info["shape"]), dtype_from_name(info["dtype"]),
                                 load=load))
    config = read_config(root)
    config.setdefault("architectures", [manifest["architecture"]])
    source = {"format": FORMAT, "tp_size": tp}
    return Checkpoint(FORMAT, config, tensors, find_extra_files(root), source, manifest)


# ----------------------------------------------------------------------------------- writing

def _plan_parts(tensors: List[TensorRef], shard_bytes: Dict[str, int], max_bytes: int
                ) -> Dict[str, int]:
    """Assigns each tensor a part index; every rank has the same sizes, so the same parts."""
    part, size, out = 0, 0, {}
    for t in tensors:
        if size and size + shard_bytes[t.name] > max_bytes:
            part, size = part + 1, 0
        out[t.name] = part
        size += shard_bytes[t.name]
    return out


def _rank_slice(t: TensorRef, p: Placement, tp: int, rank: int, full) -> torch.Tensor:
    if full is not None:
        return shard(full, p, tp, rank)
    pieces = [t.load_rows(a, b) for a, b in shard_rows(p, t.shape, tp, rank)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def write(out: Path, ckpt: Checkpoint, tp: int, placements: Dict[str, Placement],
          styles: Dict[str, str], architecture: str, dtype: Optional[torch.dtype] = None,
          quantization: Optional[dict] = None, keep_dtype: Iterable[str] = (),
          extra: Optional[Dict[str, dict]] = None, max_part_bytes: int = MAX_PART_BYTES,
          progress: bool = True) -> dict:
    """Writes `ckpt` split `tp` ways into the (empty, temporary) folder `out`; returns the
    manifest (`finish` writes it). Reads each source tensor once. `dtype` casts floating
    tensors except those in `keep_dtype` (int8 scales); `extra` adds per-tensor manifest keys."""
    keep = set(keep_dtype)
    out_dtype = {t.name: dtype if (dtype and t.dtype.is_floating_point and t.name not in keep)
                 else t.dtype for t in ckpt.tensors}
    shapes = {t.name: placements[t.name].shard_shape(t.shape, tp) for t in ckpt.tensors}
    shard_bytes = {n: torch.Size(s).numel() * out_dtype[n].itemsize for n, s in shapes.items()}
    parts = _plan_parts(ckpt.tensors, shard_bytes, max_part_bytes)
    for r in range(tp):
        (out / rank_dir(r, tp)).mkdir()
    with tqdm(total=sum(t.nbytes for t in ckpt.tensors), unit="B", unit_scale=True,
              desc=f"write tp={tp}", disable=None if progress else True, leave=False) as bar:
        files = _write_ranks(out, ckpt, tp, placements, out_dtype, shapes, parts, bar)
    tensors = {t.name: {"shape": list(t.shape), "dtype": dtype_name(out_dtype[t.name]),
                        **placements[t.name].to_json(), "style": styles[t.name],
                        "part": parts[t.name], **(extra or {}).get(t.name, {})}
               for t in ckpt.tensors}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": architecture,
            "tp_size": tp, "dtype": _main_dtype(ckpt.tensors, out_dtype),
            "quantization": quantization, "source": ckpt.source, "tensors": tensors,
            "files": files}


def _write_ranks(out, ckpt, tp, placements, out_dtype, shapes, parts, bar) -> Dict[str, dict]:
    """One pass over the source; rank r's slice of each tensor goes to rank r's open part."""
    files: Dict[str, dict] = {}
    writers: Dict[Tuple[int, int], StreamingWriter] = {}
    for t in ckpt.tensors:
        p = placements[t.name]
        by_rows = t.load_rows is not None and p.split_dim == 0 and tp > 1
        full = None if by_rows else t.load()
        for r in range(tp):
            key = (r, parts[t.name])
            if key not in writers:
                _close_finished(writers, files, out, tp)
                members = [(n.name, shapes[n.name], out_dtype[n.name]) for n in ckpt.tensors
                           if parts[n.name] == key[1]]
                writers[key] = StreamingWriter(out / part_path(r, tp, key[1]), members)
            writers[key].write(t.name, _rank_slice(t, p, tp, r, full).to(out_dtype[t.name]))
        del full
        bar.update(t.nbytes)
    _close_finished(writers, files, out, tp)
    return files


def _close_finished(writers, files, out: Path, tp: int) -> None:
    for key in [k for k, w in writers.items() if w.done]:
        nbytes, sha = writers.pop(key).close()
        files[part_path(key[0], tp, key[1])] = {"bytes": nbytes, "sha256": sha}


def _main_dtype(tensors: List[TensorRef], out_dtype: Dict[str, torch.dtype]) -> str:
    by_bytes: Dict[torch.dtype, int] = {}
    for t in tensors:
        if out_dtype[t.name].is_floating_point:
            by_bytes[out_dtype[t.name]] = by_bytes.get(out_dtype[t.name], 0) + t.nbytes
    return dtype_name(max(by_bytes, key=by_bytes.get)) if by_bytes else "none"


def finish(out: Path, manifest: dict) -> None:
    """Hashes the non-tensor files (config, tokenizer) into the manifest and writes it."""
    for p in sorted(out.iterdir()):
        if p.is_file() and p.name != MANIFEST:
            manifest["files"][p.name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    manifest["files"] = dict(sorted(manifest["files"].items()))
    (out / MANIFEST).write_text(dump_manifest(manifest))


def dump_manifest(manifest: dict) -> str:
    """JSON with one line per tensor and per file: readable, diffable, still plain JSON."""
    lines = []
    for key, value in manifest.items():
        if key in ("tensors", "files"):
            rows = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items()]
            lines.append(f" {json.dumps(key)}: {{\n" + ",\n".join(rows) + "\n }")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


# ----------------------------------------------------------------------------------- verify

def verify(path: Path, hashes: bool = True) -> List[str]:
    """Problems found (empty = sound): each names the file and, where relevant, the tensor."""
    root, manifest = load_manifest(path)
    problems = []
    for rel, info in manifest["files"].items():
        p = root / rel
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != info["bytes"]:
            problems.append(f"{p}: {p.stat().st_size} bytes, manifest says {info['bytes']}")
        elif hashes and sha256_file(p) != info["sha256"]:
            problems.append(f"{p}: sha256 mismatch (the file was modified or corrupted)")
    tp = manifest["tp_size"]
    headers: Dict[Path, object] = {}
    for name, info in manifest["tensors"].items():
        want = Placement.from_json(info).shard_shape(info["shape"], tp)
        for r in range(tp):
            problems += _check_tensor(root, manifest, name, info, r, tuple(want), headers)
    return list(dict.fromkeys(problems))


def _check_tensor(root, manifest, name, info, rank, want, headers) -> List[str]:
    p = root / part_path(rank, manifest["tp_size"], info.get("part", 0))
    if not p.is_file():
        return []  # reported as a missing file
    if p not in headers:
        try:
            headers[p] = SafetensorsFile(p)
        except CheckpointError as e:
            headers[p] = e
    f = headers[p]
    if isinstance(f, CheckpointError):
        return [str(f)]
    if name not in f.entries:
        return [f"{p}: tensor '{name}' missing"]
    got = f.shape(name)
    if got != want:
        return [f"{p}: tensor '{name}' has shape {list(got)}, manifest implies {list(want)}"]
    if dtype_name(f.dtype(name)) != info["dtype"]:
        return [f"{p}: tensor '{name}' is {dtype_name(f.dtype(name))}, manifest says "
                f"{info['dtype']}"]
    return []
