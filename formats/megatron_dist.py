"""Megatron-core distributed checkpoints (`--ckpt-format torch_dist`, Megatron's default) -> the
legacy reader's machinery (formats/megatron.py).

On disk (megatron.core.dist_checkpointing over torch.distributed.checkpoint, DCP):
    ROOT/latest_checkpointed_iteration.txt     as for the legacy layout
    ROOT/iter_0000001/ (or release/)
        metadata.json     {"sharded_backend": "torch_dist", "sharded_backend_version": 1},
                          written last, when the save completed
        .metadata         a plain pickle of DCP's `Metadata`: per key the GLOBAL size, dtype and
                          chunks (offsets, sizes); `storage_data` maps (key, chunk offsets) to
                          (relative file, byte offset, length)
        __{rank}_{i}.distcp  the chunks: each a torch.save blob (zip) at its byte offset; byte
                          entries (io.BytesIO: `_extra_state`, `common_state`) are raw bytes
        common.pt         older megatron-core only; 0.19 keeps that non-sharded state (args,
                          checkpoint_version, iteration, ...) as the byte entry
                          `common_state/shard_0_1`: torch.save([state])
Keys are megatron-core names without the layer index: `decoder.layers.<rest>` has a leading
layer axis (global shape [num_layers, ...]); every tensor is TP-merged (the global view), the
SwiGLU `linear_fc1` as [gate_all; up_all] (megatron's apply_swiglu_sharded_factory), which is a
TP 1 legacy file's layout, as are QKV (per query group: its query heads, K, V) and all others.
Models with non-homogeneous layers keep `decoder.layers.N.<rest>` unstacked. Optimizer, RNG and
rerun-state entries are ignored.

So the whole checkpoint is presented to megatron.py as ONE TP 1 / PP 1 rank file whose native
`decoder.layers.N.*` tensors are slices of the stacked ones. Loading one reads only the chunks
that overlap its layer. `.metadata` goes through a narrow unpickler (DCP's metadata classes as
inert records, torch.Size, dtypes); chunk blobs and the common state through
torch.load(weights_only=True) with safe_pickle's stand-ins: nothing in the checkpoint runs code.
"""
from __future__ import annotations

import io
import json
import math
import pickle
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from . import ReadOptions
from . import megatron
from .checkpoint import Checkpoint
from .errors import CheckpointError, UnsafePickleError, read_json_object
from .safe_pickle import INERT_PREFIXES, REAL_ALLOWED, _globals_in, load_pt, stand_in

CONFIG = "metadata.json"
DCP_METADATA = ".metadata"
COMMON_PT = "common.pt"
COMMON_KEY = "common_state/shard_0_1"
BACKEND, BACKEND_VERSION = "torch_dist", 1
STACKED = re.compile(r"decoder\.layers\.(?!\d+\.)(.+)")   # [num_layers, ...] per-layer tensors
# optimizer state: optimizer.state.<exp_avg|exp_avg_sq|fp32_param>.<model key>, prefixed with
# chained_N. for chained optimizers unless chained_optim_avoid_prefix
NOT_MODEL = re.compile(r"(?:chained_\d+\.)?(?:optimizer|opt_param_scheduler)\b.*|"
                       r"(?:rng_state|rerun_state_machine)\b.*")
SWIGLU_SPLIT = re.compile(r"(.+\.linear_fc1\.(?:weight|bias))_([wv])")  # singleton_local_shards
FILE_NAME = re.compile(r"[\w.-]+")                                      # no folders, no ..
HOW_TO_CONVERT = ("re-save it with Megatron-LM's --ckpt-format torch_dist (a run with "
                  "--ckpt-convert-format torch_dist --ckpt-convert-save DIR converts a checkpoint)")


def is_dist_folder(path: Path) -> bool:
    """An iter_XXXXXXX folder of a distributed save: DCP's .metadata or megatron's metadata.json."""
    if (path / DCP_METADATA).is_file():
        return True
    try:
        return "sharded_backend" in json.loads((path / CONFIG).read_text())
    except (OSError, ValueError, TypeError, UnicodeDecodeError):
        return False


# ---- .metadata: a pickle read through an allowlist ------------------------------------------

_DCP = "torch.distributed.checkpoint."
RECORDS = {_DCP + n for n in (
    "metadata.Metadata", "metadata.TensorStorageMetadata", "metadata.BytesStorageMetadata",
    "metadata.ChunkStorageMetadata", "metadata.TensorProperties", "metadata.StorageMeta",
    "metadata.MetadataIndex", "metadata._MEM_FORMAT_ENCODING", "filesystem._StorageInfo",
    # megatron-core keeps its cached save plans in the Metadata too (`all_local_plans`)
    "planner.SavePlan", "planner.WriteItem", "planner.WriteItemType", "planner.TensorWriteData",
    "planner.BytesIOWriteData")}
PATHS = {f"pathlib.{c}" for c in ("Path", "PosixPath", "WindowsPath", "PurePosixPath",
                                   "PureWindowsPath")}
_records: Dict[str, type] = {}


def _path_text(*parts) -> str:
    """A pickled pathlib path, kept as text (never used to open anything)."""
    return "/".join(map(str, parts))


class _Record:
    """Inert stand-in for one DCP metadata class: keeps its pickled state (`state`, a dict or,
    for TensorProperties, a tuple) and constructor arguments (`args`, enums); runs nothing."""
    args: tuple = ()
    state = None

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def field(self, name: str):
        if not isinstance(self.state, dict) or name not in self.state:
            raise TypeError(f"a {type(self).__qualname__} without '{name}'")
        return self.state[name]


def _record(qualified: str) -> type:
    if qualified not in _records:
        module, _, name = qualified.rpartition(".")
        _records[qualified] = type(name, (_Record,), {"__module__": module, "__qualname__": name})
    return _records[qualified]


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        qualified = f"{module}.{name}"
        if qualified in RECORDS:
            return _record(qualified)
        if qualified == "torch.Size":
            return torch.Size
        if qualified == "torch.serialization._get_layout":   # layouts pickle by name
            return str
        if qualified in PATHS:  # StorageMeta.checkpoint_id of torch's own FileSystemWriter
            return _path_text
        value = getattr(torch, name, None) if module == "torch" else None
        if isinstance(value, (torch.dtype, torch.layout)):
            return value
        raise UnsafePickleError(
            f"{self.path}: refused to load: the pickle references '{qualified}', which is not "
            "part of torch.distributed.checkpoint metadata and could run code; copy the "
            "checkpoint's own .metadata again")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not part of DCP metadata")


class _Chunk:
    """One stored piece of a global tensor: where it sits in the tensor and in the files."""
    __slots__ = ("offsets", "sizes", "file", "start", "length")

    def __init__(self, offsets, sizes, file, start, length):
        self.offsets, self.sizes = offsets, sizes
        self.file, self.start, self.length = file, start, length


class _Global:
    """One DCP tensor key: global size, dtype, chunks."""

    def __init__(self, key: str, size: Tuple[int, ...], dtype: torch.dtype, chunks: List[_Chunk]):
        self.key, self.size, self.dtype, self.chunks = key, size, dtype, chunks


def _read_metadata(folder: Path) -> Tuple[Dict[str, _Global], Dict[str, _Chunk]]:
    """(tensor key -> _Global, byte-entry key -> its storage) from DCP's .metadata."""
    path = folder / DCP_METADATA
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a torch_dist checkpoint folder holds DCP's "
                              ".metadata next to its __*.distcp files: copy it from the save")
    not_dcp = (f"{path}: not torch.distributed.checkpoint metadata ({{}}); the file is damaged "
               "or from something else: copy the checkpoint's .metadata again")
    try:
        with open(path, "rb") as f:
            unpickler = _MetadataUnpickler(f)
            unpickler.path = path
            md = unpickler.load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated, not a pickle, bad opcodes: all data errors here
        raise CheckpointError(not_dcp.format(f"{type(e).__name__}: {str(e)[:120]}")) from None
    if type(md) is not _record(_DCP + "metadata.Metadata"):
        raise CheckpointError(not_dcp.format(f"it holds a {type(md).__name__}"))
    try:
        return _tensors_and_bytes(md)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise CheckpointError(not_dcp.format(str(e)[:160])) from None


def _storage(md) -> Dict[Tuple[str, Optional[tuple]], Tuple[str, int, int]]:
    """(key, chunk offsets or None for bytes) -> (relative file, byte offset, length)."""
    out = {}
    for index, info in md.field("storage_data").items():
        index.field("fqn")
        offset = index.state.get("offset")  # left out of the pickle for byte entries
        rel, start, length = info.field("relative_path"), info.field("offset"), info.field("length")
        if (info.state or {}).get("transform_descriptors"):
            raise ValueError(f"chunk of '{index.field('fqn')}' is stored transformed ("
                             f"{info.state['transform_descriptors']}), which dsinfer does not read")
        if not (isinstance(rel, str) and FILE_NAME.fullmatch(rel) and rel not in (".", "..")):
            raise ValueError(f"chunk of '{index.field('fqn')}' names the file {str(rel)[:80]!r}")
        if not (isinstance(start, int) and isinstance(length, int) and start >= 0 and length > 0):
            raise ValueError(f"chunk of '{index.field('fqn')}' has a bad byte range")
        out[(index.field("fqn"), None if offset is None else tuple(offset))] = (rel, start, length)
    return out


def _tensors_and_bytes(md) -> Tuple[Dict[str, _Global], Dict[str, _Chunk]]:
    where = _storage(md)
    tensors, byte_entries = {}, {}
    for key, entry in md.field("state_dict_metadata").items():
        if not isinstance(key, str):
            raise TypeError(f"key {key!r} is not a name")
        kind = type(entry).__qualname__
        if kind == "BytesStorageMetadata":
            if (key, None) in where:
                byte_entries[key] = _Chunk((), (), *where[(key, None)])
            continue
        if kind != "TensorStorageMetadata":
            raise TypeError(f"entry '{key}' is a {kind}")
        props = entry.field("properties")
        dtype = props.state[0] if isinstance(props.state, tuple) else props.field("dtype")
        size = tuple(int(d) for d in entry.field("size"))
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"tensor '{key}' has dtype {dtype!r}")
        chunks = []
        for c in entry.field("chunks"):
            offsets = tuple(int(o) for o in c.field("offsets"))
            sizes = tuple(int(s) for s in c.field("sizes"))
            if len(offsets) != len(size) or len(sizes) != len(size) or any(
                    o < 0 or s < 0 or o + s > n for o, s, n in zip(offsets, sizes, size)):
                raise ValueError(f"tensor '{key}' of size {list(size)} has a chunk at "
                                 f"{list(offsets)} of size {list(sizes)}")
            if (key, offsets) not in where:
                raise KeyError(f"no storage for the chunk of '{key}' at {list(offsets)}")
            chunks.append(_Chunk(offsets, sizes, *where[(key, offsets)]))
        if sum(math.prod(c.sizes) for c in chunks) != math.prod(size):
            raise ValueError(f"the chunks of tensor '{key}' do not cover its size {list(size)}")
        tensors[key] = _Global(key, size, dtype, chunks)
    return tensors, byte_entries


# ---- the data files -------------------------------------------------------------------------

def _torch_load_bytes(data: bytes, where: str):
    """torch.load(weights_only=True) of one blob, with safe_pickle's stand-ins for megatron's
    classes (args enums) and refusals for anything else."""
    try:
        names = _globals_in(io.BytesIO(data))
    except Exception as e:
        raise CheckpointError(f"{where}: not a torch.save blob ({type(e).__name__}: "
                              f"{str(e)[:100]}); the file is damaged: copy it again") from None
    allowed = [REAL_ALLOWED[n] for n in names if n in REAL_ALLOWED]
    allowed += [stand_in(n) for n in names if n.startswith(INERT_PREFIXES)]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"'{culprit.group(1)}'" if culprit else "an object torch refuses to rebuild"
        raise UnsafePickleError(f"{where}: refused to load: the pickle references {what}, which "
                                "could run code; dsinfer loads only tensors and plain data")
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{where}: cannot read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); the file is damaged: "
                              "copy it again") from None


class _Store:
    """The folder's data files: byte ranges checked up front, chunks read on demand."""

    def __init__(self, folder: Path, tensors: Dict[str, _Global], byte_entries: Dict[str, _Chunk]):
        self.folder = folder
        need: Dict[str, Tuple[int, str]] = {}  # file -> (bytes needed, a key stored there)
        for key, chunk in [(g.key, c) for g in tensors.values() for c in g.chunks] + \
                [(k, c) for k, c in byte_entries.items()]:
            end = chunk.start + chunk.length
            if end > need.get(chunk.file, (0, ""))[0]:
                need[chunk.file] = (end, key)
        for name, (end, key) in sorted(need.items()):
            path = folder / name
            if not path.is_file():
                raise CheckpointError(f"{path}: missing, but {DCP_METADATA} stores tensor chunks "
                                      f"there (e.g. '{key}'); copy every __*.distcp file of the "
                                      "checkpoint")
            have = path.stat().st_size
            if have < end:
                raise CheckpointError(f"{path}: truncated ({have} bytes, but {DCP_METADATA} puts "
                                      f"'{key}' up to byte {end}); copy the file again")

    def raw(self, chunk: _Chunk) -> bytes:
        with open(self.folder / chunk.file, "rb") as f:
            f.seek(chunk.start)
            data = f.read(chunk.length)
        if len(data) != chunk.length:  # shrank since we checked
            raise CheckpointError(f"{self.folder / chunk.file}: truncated; copy it again")
        return data

    def chunk(self, g: _Global, c: _Chunk) -> torch.Tensor:
        where = f"{self.folder / c.file} (tensor '{g.key}', chunk at {list(c.offsets)})"
        t = _torch_load_bytes(self.raw(c), where)
        if not isinstance(t, torch.Tensor) or t.numel() != math.prod(c.sizes) or t.dtype != g.dtype:
            got = f"{type(t).__name__}" if not isinstance(t, torch.Tensor) else \
                f"{t.dtype} tensor of {t.numel()} elements"
            raise CheckpointError(f"{where}: holds a {got}, but {DCP_METADATA} says {g.dtype} "
                                  f"{list(c.sizes)}; the files do not match: copy the checkpoint "
                                  "again")
        return t.reshape(c.sizes)

    def read(self, g: _Global, layer: Optional[int]) -> torch.Tensor:
        """The global tensor, or (layer given) its slice [layer] along the stacked axis;
        reads only the chunks that overlap it."""
        if not g.size:
            return self.chunk(g, g.chunks[0]).reshape(())
        lo, hi = (0, g.size[0]) if layer is None else (layer, layer + 1)
        out = torch.empty((hi - lo,) + g.size[1:], dtype=g.dtype)
        for c in g.chunks:
            a, b = max(c.offsets[0], lo), min(c.offsets[0] + c.sizes[0], hi)
            if a >= b:
                continue
            piece = self.chunk(g, c)[a - c.offsets[0]: b - c.offsets[0]]
            region = (slice(a - lo, b - lo),) + tuple(
                slice(o, o + s) for o, s in zip(c.offsets[1:], c.sizes[1:]))
            out[region] = piece
        return out[0] if layer is not None else out

    def common_state(self, byte_entries: Dict[str, _Chunk]) -> dict:
        """megatron's non-sharded state: common.pt (older megatron-core) or the common_state
        entry (torch.save([state]))."""
        if (self.folder / COMMON_PT).is_file():
            state = load_pt(self.folder / COMMON_PT)
        elif COMMON_KEY in byte_entries:
            c = byte_entries[COMMON_KEY]
            state = _torch_load_bytes(self.raw(c), f"{self.folder / c.file} ('{COMMON_KEY}')")
            state = state[0] if isinstance(state, list) and len(state) == 1 else state
        else:
            raise CheckpointError(f"{self.folder}: neither {COMMON_PT} nor a '{COMMON_KEY}' "
                                  "entry: the args that describe the model are missing; copy "
                                  "the whole iter folder of the save")
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.folder}: the common state is a {type(state).__name__}, "
                                  "not megatron's dict; copy the checkpoint again")
        return state


# ---- the checkpoint as one legacy rank file -------------------------------------------------

class _DistFile(megatron.RankFileBase):
    """megatron.py's rank-file interface (path, args, version, iteration, shapes, tensor, meta)
    over the global tensors: native names decoder.layers.{L}.<rest>, TP 1 layouts."""

    def __init__(self, folder: Path, store: _Store, tensors: Dict[str, _Global], common: dict):
        self.path, self.store = folder, store
        self.args = common.get("args")
        self.version = common.get("checkpoint_version")
        self.iteration = common.get("iteration")
        self.shapes: Dict[str, Tuple[tuple, torch.dtype]] = {}
        self.parts: Dict[str, List[Tuple[_Global, Optional[int]]]] = {}  # cat along dim 0
        for key, g in tensors.items():
            if NOT_MODEL.fullmatch(key) or megatron.SKIP.fullmatch(key):
                continue
            twin = SWIGLU_SPLIT.fullmatch(key)   # ..._w (gate) and ..._v (up): one [gate; up]
            name = twin[1] if twin else key
            stacked = STACKED.fullmatch(name)
            if stacked and not g.size:
                raise CheckpointError(f"{folder / DCP_METADATA}: '{key}' has no layer axis; the "
                                      "metadata is damaged")
            for layer in range(g.size[0]) if stacked else [None]:
                native = name if layer is None else f"decoder.layers.{layer}.{stacked[1]}"
                parts = self.parts.setdefault(native, [])
                parts.insert(0 if twin and twin[2] == "w" else len(parts), (g, layer))
        # legacy order: embedding, then layer by layer, then final norm and output layer
        self.parts = dict(sorted(self.parts.items(), key=lambda kv: _order(kv[0])))
        for native, parts in self.parts.items():
            shapes = [g.size if layer is None else g.size[1:] for g, layer in parts]
            if len(shapes) > 1:
                shapes = [(sum(s[0] for s in shapes),) + tuple(shapes[0][1:])]
            self.shapes[native] = (tuple(shapes[0]), parts[0][0].dtype)

    def tensor(self, name: str) -> torch.Tensor:
        pieces = [self.store.read(g, layer) for g, layer in self.parts[name]]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)


def _order(native: str) -> Tuple[int, int]:
    m = re.match(r"decoder\.layers\.(\d+)\.", native)
    return (1, int(m[1])) if m else (0 if native.startswith("embedding.") else 2, 0)


def _check_config(folder: Path):
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(
            f"{folder}: a torch.distributed.checkpoint folder without megatron's {CONFIG}: either "
            "megatron's torch_dcp / fsdp_dtensor format, which dsinfer does not read, or a save "
            f"that did not finish (megatron writes {CONFIG} last); {HOW_TO_CONVERT}")
    config = read_json_object(path, "megatron's dist-checkpoint config",
                              "copy the checkpoint's metadata.json again")
    backend, version = config.get("sharded_backend"), config.get("sharded_backend_version", 1)
    if backend != BACKEND:
        raise CheckpointError(f"{path}: sharded_backend {backend!r} is not supported (dsinfer "
                              f"reads {BACKEND!r} only); {HOW_TO_CONVERT}")
    if version != BACKEND_VERSION:
        raise CheckpointError(f"{path}: sharded_backend_version {version!r} is not supported "
                              f"(dsinfer reads {BACKEND} version {BACKEND_VERSION}); "
                              f"{HOW_TO_CONVERT}")


def open_folder(folder: Path) -> _DistFile:
    """The iter folder of a torch_dist save as one merged legacy rank file (nothing read yet
    but .metadata, the common state and the files' sizes)."""
    _check_config(folder)
    tensors, byte_entries = _read_metadata(folder)
    store = _Store(folder, tensors, byte_entries)
    return _DistFile(folder, store, tensors, store.common_state(byte_entries))


def read_folder(folder: Path, options: ReadOptions, iteration) -> Checkpoint:
    f = open_folder(folder)
    args = f.args
    source = {"format": "megatron", "ckpt_format": BACKEND,
              "tp_size": megatron._arg(args, "tensor_model_parallel_size", 1),
              "pp_size": megatron._arg(args, "pipeline_model_parallel_size", 1)}
    return megatron._build([[f]], options, iteration, default_version=None, source=source)
