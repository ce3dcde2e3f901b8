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
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Tuple

from .checkpoint import Checkpoint, TensorRef, find_extra_files, load_config
from .errors import CheckpointError, read_json_object
from .layout import Placement, shard, shard_rows, unshard
from .safetensors_io import (CODE_OF_NAME, DTYPE_INFO, SafetensorsFile, StreamingWriter, _numel,
                             sha256_file)

if TYPE_CHECKING:  # torch (and tqdm) are imported where tensors are handled, not at import:
    import torch   # reading a manifest or planning a byte-level copy does not need them

FORMAT = "dsinfer"
FORMAT_VERSION = 1
MANIFEST = "dsinfer.json"
MAX_PART_BYTES = 4 * 1024 ** 3
# How a tensor is laid out across ranks (the runtime picks its TP module from this).
STYLES = ("colwise", "packed_colwise", "rowwise", "rowwise_bias", "vocab", "replicate", "scale")


def dtype_name(dtype: "torch.dtype") -> str:
    return str(dtype).replace("torch.", "")


def is_dtype_name(name: str) -> bool:
    """`name` is a torch dtype attribute ("float16", "half", ...); torch is imported only for
    names outside the safetensors table."""
    if name in CODE_OF_NAME:
        return True
    import torch
    return isinstance(getattr(torch, name, None), torch.dtype)


def dtype_from_name(name: str) -> "torch.dtype":
    import torch
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
    """(root folder, manifest) from a dsinfer folder or its dsinfer.json, its schema checked."""
    path = Path(path)
    root, mpath = (path, path / MANIFEST) if path.is_dir() else (path.parent, path)
    manifest = read_json_object(mpath, "the manifest object", "the manifest is corrupt",
                                missing="not a dsinfer checkpoint")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: 'format' is {_short(manifest.get('format'))}, not "
                              "'dsinfer'")
    version = manifest.get("format_version")
    if not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{mpath}: format_version {_short(version)} is not supported by "
                              f"this dsinfer (reads 1 to {FORMAT_VERSION}); upgrade dsinfer")
    for key in ("tp_size", "tensors", "files", "architecture", "dtype"):
        if key not in manifest:
            raise CheckpointError(f"{mpath}: manifest has no '{key}'; the manifest is corrupt")
    problem = _schema_problem(manifest)
    if problem:
        raise CheckpointError(f"{mpath}: {problem}; the manifest is corrupt (copy the "
                              "checkpoint again or re-run dsinfer-reshard)")
    return root, manifest


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _schema_problem(m: dict) -> Optional[str]:
    """What makes the manifest unusable (wrong types, impossible values), or None."""
    if not isinstance(m["architecture"], str):
        return f"'architecture' is {_short(m['architecture'])}, not a name"
    tp = m["tp_size"]
    if not _is_int(tp) or tp < 1:
        return f"'tp_size' is {_short(tp)}, not a positive integer"
    if not isinstance(m["dtype"], str):
        return f"'dtype' is {_short(m['dtype'])}, not a name"
    for key, kind in (("quantization", dict), ("source", dict)):
        if m.get(key) is not None and not isinstance(m[key], kind):
            return f"'{key}' is {_short(m[key])}"
    quant = m.get("quantization")
    if isinstance(quant, dict) and not isinstance(quant.get("method"), str):
        return "'quantization' has no 'method'"
    if not isinstance(m["files"], dict) or not isinstance(m["tensors"], dict):
        return "'files' and 'tensors' must be objects"
    for rel, info in m["files"].items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts or not rel:
            return f"file {_short(rel)} is not a path inside the checkpoint"
        if not (isinstance(info, dict) and _is_int(info.get("bytes")) and info["bytes"] >= 0
                and isinstance(info.get("sha256"), str)):
            return f"file '{rel}' needs 'bytes' (integer) and 'sha256'"
    parts = set()
    for name, info in m["tensors"].items():
        problem = _tensor_problem(info)
        if problem:
            return f"tensor '{name}': {problem}"
        parts.add(info.get("part", 0))
    if m["tensors"] and tp * len(parts) > len(m["files"]):
        return f"'tp_size' {tp} x {len(parts)} part(s) exceeds the {len(m['files'])} files listed"
    for r in range(tp if m["tensors"] else 0):
        missing = [part_path(r, tp, k) for k in sorted(parts)
                   if part_path(r, tp, k) not in m["files"]]
        if missing:
            return f"rank file {missing[0]} is not listed in 'files'"
    return None


def _tensor_problem(info) -> Optional[str]:
    if not isinstance(info, dict):
        return f"entry is {_short(info)}"
    shape, dim, parts = info.get("shape"), info.get("split_dim"), info.get("parts")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2 ** 48 for d in shape):
        return f"shape {_short(shape)} is not a list of sizes"
    if not isinstance(info.get("dtype"), str) or not is_dtype_name(info["dtype"]):
        return f"dtype {_short(info.get('dtype'))} is not a torch dtype"
    if dim is not None and not (_is_int(dim) and 0 <= dim < len(shape)):
        return f"split_dim {_short(dim)} does not fit shape {shape}"
    if parts is not None and parts != [] and (
            dim is None or not isinstance(parts, list)
            or not all(_is_int(p) and p > 0 for p in parts) or sum(parts) != shape[dim]):
        return f"parts {_short(parts)} do not add up to dim {dim} of shape {shape}"
    part = info.get("part", 0)
    if not _is_int(part) or not 0 <= part < 1000:
        return f"part {_short(part)} is not a part number"
    if info.get("style", "replicate") not in STYLES:
        return f"style {_short(info.get('style'))} is not one of {', '.join(STYLES)}"
    return None


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

    def read(self, name: str, rank: int) -> "torch.Tensor":
        f = self.get(rank, self.manifest["tensors"][name].get("part", 0))
        self.check(f, name)
        return f.read(name)

    def read_rows(self, name: str, rank: int, start: int, stop: int) -> "torch.Tensor":
        f = self.get(rank, self.manifest["tensors"][name].get("part", 0))
        self.check(f, name)
        return f.read_rows(name, start, stop)

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
        if DTYPE_INFO[f.dtype_code(name)][0] != info["dtype"]:
            raise CheckpointError(f"{f.path}: tensor '{name}' is {DTYPE_INFO[f.dtype_code(name)][0]}, "
                                  f"the manifest says {info['dtype']}; the files do not belong "
                                  "together (re-run dsinfer-reshard)")

    def rank_files(self, rank: int) -> List[SafetensorsFile]:
        """Every part file of one rank, opened (headers) and checked against the manifest."""
        parts = sorted({i.get("part", 0) for i in self.manifest["tensors"].values()})
        files = [self.get(rank, k) for k in parts]
        for name, info in self.manifest["tensors"].items():
            self.check(files[parts.index(info.get("part", 0))], name)
        return files


def read_rank(path: Path, rank: int) -> Dict[str, "torch.Tensor"]:
    """Rank `rank`'s slices only, as stored: what a runtime rank loads."""
    root, manifest = load_manifest(path)
    files = RankFiles(root, manifest)
    return {name: files.read(name, rank) for name in manifest["tensors"]}


def read_config(root: Path) -> dict:
    path = root / "config.json"
    return load_config(path) if path.is_file() else {}


def _row_loader(files: RankFiles, name: str, info: dict, tp: int):
    """Rows [a, b) of a tensor stored whole (replicated) or split on dim 0 in one part, as
    pieces read from the ranks that hold them; None for other layouts."""
    p = Placement.from_json(info)
    if not info["shape"] or not info["shape"][0] or p.parts or p.split_dim not in (None, 0):
        return None
    if p.replicated:
        return lambda a, b: [files.read_rows(name, 0, a, b)]
    n = info["shape"][0] // tp

    def rows(a: int, b: int) -> List["torch.Tensor"]:
        return [files.read_rows(name, k, max(a, k * n) - k * n, min(b, (k + 1) * n) - k * n)
                for k in range(a // n, (b - 1) // n + 1)] if b > a else []
    return rows


def read(path: Path, options=None) -> Checkpoint:
    root, manifest = load_manifest(path)
    files = RankFiles(root, manifest)
    tp = manifest["tp_size"]
    tensors = []
    for name, info in manifest["tensors"].items():
        placement = Placement.from_json(info)
        load = (lambda n=name, p=placement: unshard([files.read(n, r) for r in range(tp)], p))
        tensors.append(TensorRef(name, tuple(info["shape"]), dtype_from_name(info["dtype"]),
                                 load=load, load_rows=_row_loader(files, name, info, tp)))
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


def _pieces_by_rank(t: TensorRef, p: Placement, tp: int):
    """rank -> list of tensors whose dim-0 concatenation is that rank's slice. Row-wise
    readable sources give row ranges (nothing concatenated, nothing read twice); others are
    loaded whole once and sliced."""
    if t.load_rows is not None and t.shape and (p.replicated or p.split_dim == 0):
        if p.replicated or tp == 1:
            whole = t.load_rows(0, t.shape[0])
            return lambda r: whole
        return lambda r: [x for a, b in shard_rows(p, t.shape, tp, r) for x in t.load_rows(a, b)]
    full = t.load()
    return lambda r: [shard(full, p, tp, r)]


def write(out: Path, ckpt: Checkpoint, tp: int, placements: Dict[str, Placement],
          styles: Dict[str, str], architecture: str, dtype: Optional["torch.dtype"] = None,
          quantization: Optional[dict] = None, keep_dtype: Iterable[str] = (),
          extra: Optional[Dict[str, dict]] = None, max_part_bytes: int = MAX_PART_BYTES,
          progress: bool = True) -> dict:
    """Writes `ckpt` split `tp` ways into the (empty, temporary) folder `out`; returns the
    manifest (`finish` writes it). Reads each source tensor once. `dtype` casts floating
    tensors except those in `keep_dtype` (int8 scales); `extra` adds per-tensor manifest keys."""
    from tqdm.auto import tqdm
    keep = set(keep_dtype)
    out_dtype = {t.name: dtype if (dtype and t.dtype.is_floating_point and t.name not in keep)
                 else t.dtype for t in ckpt.tensors}
    shapes = {t.name: placements[t.name].shard_shape(t.shape, tp) for t in ckpt.tensors}
    shard_bytes = {n: _numel(s) * out_dtype[n].itemsize for n, s in shapes.items()}
    parts = _plan_parts(ckpt.tensors, shard_bytes, max_part_bytes)
    for r in range(tp):
        (out / rank_dir(r, tp)).mkdir()
    with tqdm(total=sum(t.nbytes for t in ckpt.tensors), unit="B", unit_scale=True,
              desc=f"write tp={tp}", disable=None if progress else True, leave=False) as bar:
        files = _write_ranks(out, ckpt, tp, placements, out_dtype, shapes, parts, bar)
    names = {t.name: dtype_name(out_dtype[t.name]) for t in ckpt.tensors}
    return new_manifest(ckpt, tp, placements, styles, parts, names, architecture, quantization,
                        extra, files, _main_dtype(ckpt.tensors, out_dtype))


def new_manifest(ckpt, tp: int, placements: Dict[str, Placement], styles: Dict[str, str],
                 parts: Dict[str, int], dtype_names: Dict[str, str], architecture: str,
                 quantization: Optional[dict], extra: Optional[Dict[str, dict]],
                 files: Dict[str, dict], main_dtype: str) -> dict:
    """The manifest of a written checkpoint (`ckpt`: its tensors in source order, its source
    description); shared by the tensor writer and the byte-copy writer."""
    tensors = {t.name: {"shape": list(t.shape), "dtype": dtype_names[t.name],
                        **placements[t.name].to_json(), "style": styles[t.name],
                        "part": parts[t.name], **(extra or {}).get(t.name, {})}
               for t in ckpt.tensors}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": architecture,
            "tp_size": tp, "dtype": main_dtype, "quantization": quantization,
            "source": ckpt.source, "tensors": tensors, "files": files}


def _write_ranks(out, ckpt, tp, placements, out_dtype, shapes, parts, bar) -> Dict[str, dict]:
    """One pass over the source; rank r's slice of each tensor goes to rank r's open part."""
    files: Dict[str, dict] = {}
    writers: Dict[Tuple[int, int], StreamingWriter] = {}
    try:
        for t in ckpt.tensors:
            pieces = _pieces_by_rank(t, placements[t.name], tp)
            for r in range(tp):
                key = (r, parts[t.name])
                if key not in writers:
                    _close_finished(writers, files, out, tp)
                    members = [(n.name, shapes[n.name], out_dtype[n.name]) for n in ckpt.tensors
                               if parts[n.name] == key[1]]
                    writers[key] = StreamingWriter(out / part_path(r, tp, key[1]), members)
                writers[key].write(t.name, [x.to(out_dtype[t.name]) for x in pieces(r)])
            del pieces
            bar.update(t.nbytes)
        _close_finished(writers, files, out, tp)
    except BaseException:  # disk full, a bad source tensor...: no writer thread or file left open
        for w in writers.values():
            w.abort()
        raise
    return files


def _close_finished(writers, files, out: Path, tp: int) -> None:
    for key in [k for k, w in writers.items() if w.done]:
        nbytes, sha = writers.pop(key).close()
        files[part_path(key[0], tp, key[1])] = {"bytes": nbytes, "sha256": sha}


def _main_dtype(tensors: List[TensorRef], out_dtype: Dict[str, "torch.dtype"]) -> str:
    return main_dtype((dtype_name(out_dtype[t.name]), out_dtype[t.name].is_floating_point,
                       t.nbytes) for t in tensors)


def main_dtype(items: Iterable[Tuple[str, bool, int]]) -> str:
    """The floating dtype holding most bytes, from (dtype name, floating?, source bytes) per
    tensor in source order (the first one wins a tie); "none" without floating tensors."""
    by_bytes: Dict[str, int] = {}
    for name, floating, nbytes in items:
        if floating:
            by_bytes[name] = by_bytes.get(name, 0) + nbytes
    return max(by_bytes, key=by_bytes.get) if by_bytes else "none"


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

def verify(path: Path, hashes: bool = True, ranks: Optional[Iterable[int]] = None) -> List[str]:
    """Problems found (empty = sound): each names the file and, where relevant, the tensor.
    `ranks`: check only these ranks' files (and the shared ones), as a runtime rank does."""
    root, manifest = load_manifest(path)
    tp = manifest["tp_size"]
    ranks = range(tp) if ranks is None else list(ranks)
    mine = {rank_dir(r, tp) for r in ranks}
    problems = []
    for rel, info in manifest["files"].items():
        if "/" in rel and rel.split("/")[0] not in mine:
            continue
        p = root / rel
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != info["bytes"]:
            problems.append(f"{p}: {p.stat().st_size} bytes, manifest says {info['bytes']}")
        elif hashes and sha256_file(p) != info["sha256"]:
            problems.append(f"{p}: sha256 mismatch (the file was modified or corrupted)")
    headers: Dict[Path, object] = {}
    for name, info in manifest["tensors"].items():
        want = Placement.from_json(info).shard_shape(info["shape"], tp)
        for r in ranks:
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
