"""HF transformers checkpoints: reader (safetensors, sharded index, legacy pytorch_model.bin)
and writer (model.safetensors, sharded with an index above `max_shard_bytes`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

from .checkpoint import Checkpoint, TensorRef, find_extra_files, load_config
from .errors import CheckpointError
from .safetensors_io import SafetensorsFile, StreamingWriter

if TYPE_CHECKING:  # torch, tqdm and the pickle loader are imported where tensors are handled:
    import torch   # finding and planning a safetensors folder does not need them

# weights file -> index file, in order of preference
WEIGHT_FILES = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
MAX_SHARD_BYTES = 5 * 1000 ** 3


def sniff(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and _weight_files(path) is not None


def _weight_files(folder: Path) -> Optional[List[Path]]:
    for single, index in WEIGHT_FILES:
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
                files = [folder / f for f in dict.fromkeys(weight_map.values())]
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
                raise CheckpointError(f"{folder / index}: unreadable index ({type(e).__name__}: "
                                      f"{str(e)[:100]}); copy it again") from None
            return files
        if (folder / single).is_file():
            return [folder / single]
    return None


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return load_config(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; put the model's HF config.json next to the "
                              "weights") from None


def _refs_safetensors(path: Path) -> List[TensorRef]:
    f = SafetensorsFile(path)
    return [TensorRef(n, f.shape(n), f.dtype(n), load=lambda n=n: f.read(n),
                      load_rows=lambda a, b, n=n: [f.read_rows(n, a, b)]) for n in f.names()]


def _refs_pickle(path: Path) -> List[TensorRef]:
    import torch
    from .safe_pickle import load_pt
    sd = load_pt(path)  # memory-mapped: tensors are read when touched
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict of tensors")
    return [TensorRef(n, tuple(t.shape), t.dtype, load=lambda t=t: t)
            for n, t in sd.items() if isinstance(t, torch.Tensor)]


def read_files(files: List[Path], config: dict, extra: Dict[str, Path]) -> Checkpoint:
    tensors: List[TensorRef] = []
    seen = set()
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{path}: weight file listed in the index is missing; copy "
                                  "the complete checkpoint")
        refs = _refs_safetensors(path) if path.suffix == ".safetensors" else _refs_pickle(path)
        for ref in refs:
            if ref.name in seen:
                raise CheckpointError(f"{path}: tensor '{ref.name}' appears in two weight files")
            seen.add(ref.name)
            tensors.append(ref)
    if not tensors:
        raise CheckpointError(f"{files[0] if files else '?'}: no tensors found")
    return Checkpoint("hf", config, tensors, extra, {"format": "hf", "tp_size": 1})


def read(path: Path, options) -> Checkpoint:
    files = _weight_files(path)
    if files is None:
        raise CheckpointError(f"{path}: no model.safetensors(.index.json) or "
                              "pytorch_model.bin(.index.json) found")
    return read_files(files, read_config(path), find_extra_files(path))


def read_descriptor(desc: dict, base: Path, options) -> Checkpoint:
    """Tutorial descriptor {"type": "BLOOM", "checkpoints": [HF-named shard files]}."""
    files = desc.get("checkpoints")
    if isinstance(files, str):
        files = [files]
    if not files:
        raise CheckpointError(f"{base}: descriptor lists no checkpoint files")
    return read_files([base / f for f in files], read_config(base), find_extra_files(base))


def write(out: Path, ckpt: Checkpoint, dtype: Optional["torch.dtype"] = None,
          max_shard_bytes: int = MAX_SHARD_BYTES, progress: bool = True) -> Dict[str, dict]:
    """Writes `ckpt` into the (empty, temporary) folder `out`; returns {file: {bytes, sha256}}."""
    from tqdm.auto import tqdm
    out_dtype = {t.name: dtype if (dtype and t.dtype.is_floating_point) else t.dtype
                 for t in ckpt.tensors}
    shards = _plan_shards(ckpt.tensors, out_dtype, max_shard_bytes)
    names = shard_names(len(shards))
    files = {}
    with tqdm(total=sum(t.nbytes for t in ckpt.tensors), unit="B", unit_scale=True,
              desc="write hf", disable=None if progress else True, leave=False) as bar:
        for fname, shard in zip(names, shards):
            w = StreamingWriter(out / fname, [(t.name, t.shape, out_dtype[t.name]) for t in shard],
                                metadata={"format": "pt"})
            try:
                for t in shard:
                    pieces = t.load_rows(0, t.shape[0]) if t.load_rows and t.shape else [t.load()]
                    w.write(t.name, [x.to(out_dtype[t.name]) for x in pieces])
                    bar.update(t.nbytes)
                nbytes, sha = w.close()
            except BaseException:  # no writer thread or file left open
                w.abort()
                raise
            files[fname] = {"bytes": nbytes, "sha256": sha}
    write_index(out, names, shards, files)
    write_config(out, ckpt.config, dtype)
    return files


def shard_names(n: int) -> List[str]:
    return (["model.safetensors"] if n == 1 else
            [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])


def write_index(out: Path, names: List[str], shards, files: Dict[str, dict]) -> None:
    """model.safetensors.index.json when the weights span several files."""
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(f["bytes"] for f in files.values())},
                 "weight_map": {t.name: n for n, s in zip(names, shards) for t in s}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _plan_shards(tensors, out_dtype, max_bytes, itemsize=lambda d: d.itemsize
                 ) -> List[List[TensorRef]]:
    """Consecutive tensors per file, each file under `max_bytes` (unless one tensor is
    larger). `out_dtype[name]` is given to `itemsize`; so are the tensors' own dtypes."""
    shards: List[List[TensorRef]] = [[]]
    size = 0
    for t in tensors:
        nbytes = t.nbytes // itemsize(t.dtype) * itemsize(out_dtype[t.name])
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def write_config(out: Path, config: dict, dtype: Optional["torch.dtype"]) -> None:
    config = dict(config)
    if dtype is not None:
        key = "dtype" if "dtype" in config else "torch_dtype"
        config[key] = str(dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
