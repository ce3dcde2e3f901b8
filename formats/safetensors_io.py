"""Streaming safetensors I/O with bounded memory.

The safetensors library memory-maps whole files; touched pages of a multi-GB file then count
in the process's RSS. Here a reader parses the header and `pread`s exactly the bytes of one
tensor (or of a row range of it), and a writer lays out the header up front from known
shapes, then appends tensor bytes one at a time while hashing them.

File layout (https://github.com/huggingface/safetensors): u64 little-endian header length N,
N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {}}
(padded with spaces to a multiple of 8), then the byte buffer; offsets are relative to it.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Tuple

from .errors import CheckpointError

if TYPE_CHECKING:  # torch is imported lazily: the byte-copy fast path never needs it
    import torch

# safetensors dtype code -> (torch dtype name, bytes per element, floating point?)
DTYPE_INFO: Dict[str, Tuple[str, int, bool]] = {
    "F64": ("float64", 8, True), "F32": ("float32", 4, True), "F16": ("float16", 2, True),
    "BF16": ("bfloat16", 2, True), "I64": ("int64", 8, False), "I32": ("int32", 4, False),
    "I16": ("int16", 2, False), "I8": ("int8", 1, False), "U8": ("uint8", 1, False),
    "BOOL": ("bool", 1, False), "F8_E4M3": ("float8_e4m3fn", 1, True),
    "F8_E5M2": ("float8_e5m2", 1, True),
}
CODE_OF_NAME: Dict[str, str] = {v[0]: k for k, v in DTYPE_INFO.items()}  # "float16" -> "F16"
MAX_HEADER = 100 * 1024 * 1024


def __getattr__(name: str):
    """DTYPES (code -> torch dtype) and DTYPE_NAMES (torch dtype -> code), built on first use
    so that importing this module does not import torch."""
    if name in ("DTYPES", "DTYPE_NAMES"):
        import torch
        dtypes = {k: getattr(torch, v[0]) for k, v in DTYPE_INFO.items()}
        globals().update(DTYPES=dtypes, DTYPE_NAMES={v: k for k, v in dtypes.items()})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _is_size(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 63


def _entry_problem(e) -> Optional[str]:
    """What is wrong with one tensor's header entry (types and ranges), or None."""
    if not isinstance(e, dict):
        return f"has entry {str(e)[:40]!r}"
    if not isinstance(e.get("dtype"), str) or e["dtype"] not in DTYPE_INFO:
        return f"has unsupported dtype {str(e.get('dtype'))[:40]!r}"
    shape, offsets = e.get("shape"), e.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape) \
            or _numel(shape) >= 2 ** 60:
        return f"has shape {str(shape)[:40]!r}, not a list of sizes"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_size, offsets))
            and offsets[0] <= offsets[1]):
        return f"has data_offsets {str(offsets)[:40]!r}, not [begin, end]"
    return None


class SafetensorsFile:
    """Header of one safetensors file plus positioned reads of its tensors."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise ValueError("shorter than the 8-byte header length")
                (n,) = struct.unpack("<Q", raw)
                if n > MAX_HEADER or 8 + n > size:
                    raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
                header = json.loads(f.read(n))
        except (OSError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file "
                                  f"({str(e)[:200]}); the file is truncated "
                                  "or corrupt: copy it again") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: the header is a JSON {type(header).__name__}, "
                                  "not an object; the file is corrupt: copy it again")
        metadata = header.pop("__metadata__", None)
        self.metadata = metadata if isinstance(metadata, dict) else {}
        self.data_start = 8 + n
        self.entries: Dict[str, dict] = header
        for name, e in header.items():
            problem = _entry_problem(e)
            if problem:
                raise CheckpointError(f"{self.path}: tensor '{name}' {problem} in the header; "
                                      "the file is corrupt: copy it again")
            begin, end = e["data_offsets"]
            want = _numel(e["shape"]) * DTYPE_INFO[e["dtype"]][1]
            if end - begin != want or self.data_start + end > size:
                raise CheckpointError(
                    f"{self.path}: tensor '{name}' is truncated or its header is inconsistent "
                    f"(needs bytes {begin}..{end} of a {size - self.data_start}-byte buffer); "
                    "copy the file again")

    def names(self) -> List[str]:
        return list(self.entries)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> "torch.dtype":
        return __getattr__("DTYPES")[self.entries[name]["dtype"]]

    def dtype_code(self, name: str) -> str:
        """The safetensors dtype code ("F16", ...), without importing torch."""
        return self.entries[name]["dtype"]

    def byte_range(self, name: str) -> Tuple[int, int]:
        """Absolute [begin, end) byte offsets of a tensor's data in the file."""
        begin, end = self.entries[name]["data_offsets"]
        return self.data_start + begin, self.data_start + end

    def read(self, name: str) -> "torch.Tensor":
        shape = self.shape(name)
        return self.read_rows(name, 0, shape[0]) if shape else self._read(name, 0, 1, ())

    def read_rows(self, name: str, start: int, stop: int) -> "torch.Tensor":
        """Rows [start, stop) along dim 0, reading only their bytes."""
        shape = self.shape(name)
        row = _numel(shape[1:])
        return self._read(name, start * row, stop * row, (stop - start,) + shape[1:])

    def _read(self, name, first, last, shape) -> "torch.Tensor":
        import torch
        e = self.entries[name]
        dtype = __getattr__("DTYPES")[e["dtype"]]
        itemsize = DTYPE_INFO[e["dtype"]][1]
        out = torch.empty(_numel(shape) * itemsize, dtype=torch.uint8)
        offset = self.data_start + e["data_offsets"][0] + first * itemsize
        with open(self.path, "rb", buffering=0) as f:
            f.seek(offset)
            view = memoryview(out.numpy())
            got = 0
            while got < len(view):
                k = f.readinto(view[got:])
                if not k:
                    raise CheckpointError(f"{self.path}: tensor '{name}' is truncated; "
                                          "copy the file again")
                got += k
        return out.view(dtype).reshape(shape)


def _pieces_shape(pieces) -> Optional[tuple]:
    if len(pieces) == 1:
        return tuple(pieces[0].shape)
    if not pieces or any(p.dim() == 0 or p.shape[1:] != pieces[0].shape[1:] for p in pieces):
        return None
    return (sum(p.shape[0] for p in pieces),) + tuple(pieces[0].shape[1:])


def tensor_bytes(t: "torch.Tensor") -> memoryview:
    """The raw little-endian bytes of a tensor (contiguous copy when needed)."""
    import torch
    t = t.detach().to("cpu")
    same_size_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    if t.dtype.itemsize in same_size_int:
        t = t.view(same_size_int[t.dtype.itemsize])  # integer copies of strided slices are
    t = t.contiguous().reshape(-1)                   # several times faster than fp16 ones
    return memoryview(t.view(torch.uint8).numpy())


def header_bytes(entries: Iterable[Tuple[str, tuple, str]],
                 metadata: Optional[Dict[str, str]] = None) -> Tuple[bytes, int]:
    """(the file's first 8 + N bytes, its total size) for tensors [(name, shape, dtype code)]
    laid out back to back in that order. Header JSON: "__metadata__" first (when given), then
    one entry per tensor in file order, compact separators, padded with spaces to 8 bytes."""
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, shape, code in entries:
        nbytes = _numel(shape) * DTYPE_INFO[code][1]
        header[name] = {"dtype": code, "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, 8 + len(raw) + offset


class StreamingWriter:
    """Writes one safetensors file whose tensor list is known before any data is.

    `plan` is [(name, shape, dtype)] in file order. `write(name, tensor)` must then be called
    for every entry, in that order. The sha256 and byte count are computed on the fly.
    """

    def __init__(self, path: Path, plan: Iterable[Tuple[str, tuple, "torch.dtype"]],
                 metadata: Optional[Dict[str, str]] = None):
        self.path = Path(path)
        self.order: List[Tuple[str, tuple, "torch.dtype"]] = [(n, tuple(s), d) for n, s, d in plan]
        codes = __getattr__("DTYPE_NAMES")
        head, self.total = header_bytes([(n, s, codes[d]) for n, s, d in self.order], metadata)
        self.hash = hashlib.sha256()
        self.bytes = 0
        self._next = 0
        self._f = open(self.path, "wb")
        # A helper thread writes and hashes while the caller prepares the next tensor (file
        # writes and hashlib both release the GIL). The queue is short: memory stays bounded.
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()
        self._emit(head)

    def _drain(self) -> None:
        while True:
            data = self._queue.get()
            if data is None:
                return
            if self._error is None:
                try:
                    self._f.write(data)
                    self.hash.update(data)
                except BaseException as e:  # re-raised in the caller's thread
                    self._error = e

    def _emit(self, data) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(data)
        self.bytes += len(data)

    def write(self, name: str, tensor) -> None:
        """`tensor`: a tensor, or a list of pieces whose dim-0 concatenation is the tensor
        (their bytes are written one after another; nothing is concatenated in memory)."""
        pieces = tensor if isinstance(tensor, (list, tuple)) else [tensor]
        want_name, shape, dtype = self.order[self._next]
        got = _pieces_shape(pieces)
        if name != want_name or got != shape or any(p.dtype != dtype for p in pieces):
            raise ValueError(f"{self.path}: expected {want_name} {shape} {dtype}, got "
                             f"{name} {got} {[p.dtype for p in pieces]}")
        for p in pieces:
            self._emit(tensor_bytes(p))
        self._next += 1

    @property
    def done(self) -> bool:
        return self._next == len(self.order)

    def abort(self) -> None:
        """After a failure (this file's or elsewhere): ends the helper thread and closes the
        file, so neither the descriptor nor the disk space of the removed file stays held."""
        self._error = self._error or RuntimeError(f"{self.path}: aborted")
        self._queue.put(None)
        self._thread.join()
        try:
            self._f.close()
        except OSError:  # the buffered tail cannot be flushed (disk full): dropped
            pass

    def close(self) -> Tuple[int, str]:
        """Flush, fsync and close; returns (bytes, sha256 hex)."""
        if not self.done:
            raise ValueError(f"{self.path}: closed after {self._next} of {len(self.order)} tensors")
        self._queue.put(None)
        self._thread.join()
        try:
            if self._error is not None:
                raise self._error
            self._f.flush()
            os.fsync(self._f.fileno())
        except BaseException:
            self.abort()
            raise
        self._f.close()
        return self.bytes, self.hash.hexdigest()


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while True:
            k = f.readinto(view)
            if not k:
                break
            h.update(view[:k])
    return h.hexdigest()
