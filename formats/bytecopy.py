"""Re-sharding safetensors checkpoints as byte copies, without torch.

When no dtype cast and no arithmetic is needed (an HF safetensors folder or a dsinfer folder
in; a dsinfer or HF folder out), every output tensor is a rearrangement of source bytes, and
this module writes it without materialising tensors (torch is not imported).

Geometry. A tensor of shape (d0, d1, ...) with element size s is seen as a byte matrix
G[rows, row_bytes], rows = d0, row_bytes = d1 * d2 * ... * s (a 0-d tensor: 1 x s).
  - a split along dim 0 selects row bands of G: whole rows, contiguous in a file;
  - a split along dim 1 selects column bands of G, (index range) x d2 x ... x s bytes wide:
    each output row gathers pieces of strided source rows.
A rank's slice is G[row bands][:, col bands] in row-major order (bands in part order), which
is what `layout.shard` followed by a contiguous copy gives, byte for byte.

Source storage is a list of `Block`s, rectangles of G stored row-major at a file offset with a
row stride: an HF tensor is one block; a dsinfer tensor split on dim 0 is one block per rank
and part (stride = row_bytes); split on dim 1, one block per rank and part whose stride is the
rank's local row (the other parts' columns sit between its rows).

Output: one job per output file on a thread pool (hashlib, file writes and numpy copies
release the GIL). A job writes the header, then each tensor's bytes: contiguous ranges straight
from a memory-mapped window of the source (hashed and written from the same page-cache pages,
no copy in Python), strided ones gathered by numpy into a buffer. Each job maps at most one
window of CHUNK bytes and holds at most one gather buffer of CHUNK bytes at a time, so peak
RSS stays bounded by threads x 2 x CHUNK. Writeback of a file starts every WRITEBACK bytes
(sync_file_range, asynchronous) and the file is fsync'ed at the end of its job while the
other jobs go on. Source files whose sha256 a dsinfer manifest lists are hashed by jobs of
the same pool and compared; a mismatch fails the run (the caller's AtomicDir leaves nothing).
"""
from __future__ import annotations

import concurrent.futures as cf
import ctypes
import dataclasses
import errno
import hashlib
import mmap
import os
import threading
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import dsinfer_format, hf
from .checkpoint import config_architecture, find_extra_files
from .errors import CheckpointError
from .layout import Placement, shard_ranges
from .safetensors_io import CODE_OF_NAME, DTYPE_INFO, SafetensorsFile, _numel, header_bytes

CHUNK = int(os.environ.get("DSINFER_COPY_CHUNK_MB", "16")) << 20  # bytes per window / stage
DIRECT = os.environ.get("DSINFER_DIRECT_IO", "1") != "0"  # O_DIRECT output where supported
WRITEBACK = int(os.environ.get("DSINFER_WRITEBACK_MB", "64")) << 20  # start writeback every N bytes (0: never)
THREADS = int(os.environ.get("DSINFER_COPY_THREADS", "0"))  # 0: cores + 1
PAGE = mmap.ALLOCATIONGRANULARITY

Band = Tuple[int, int]      # [start, stop) along rows (index) or columns (bytes) of G


# ----------------------------------------------------------------------------------- model

@dataclasses.dataclass(frozen=True)
class Block:
    """Rows x cols (cols in bytes) of a tensor's byte matrix G, stored in `path`: G[r, c] is
    at byte offset + (r - rows[0]) * stride + (c - cols[0])."""
    path: Path
    offset: int
    stride: int
    rows: Band
    cols: Band


@dataclasses.dataclass
class ByteTensor:
    """One canonical tensor of a source, located but never loaded."""
    name: str
    shape: Tuple[int, ...]
    code: str               # safetensors dtype code ("F16", ...)
    blocks: List[Block]     # sorted by (first row, first column)

    @property
    def dtype(self) -> str:  # what `hf._plan_shards` hands to its `itemsize`
        return self.code

    @property
    def dtype_name(self) -> str:
        return DTYPE_INFO[self.code][0]

    @property
    def itemsize(self) -> int:
        return DTYPE_INFO[self.code][1]

    @property
    def is_floating_point(self) -> bool:
        return DTYPE_INFO[self.code][2]

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.itemsize


@dataclasses.dataclass
class ByteCheckpoint:
    """The torch-free twin of `checkpoint.Checkpoint` (same fields, byte-located tensors)."""
    format: str
    config: dict
    tensors: List[ByteTensor]
    extra_files: Dict[str, Path]
    source: dict
    manifest: Optional[dict] = None
    hashes: Dict[Path, str] = dataclasses.field(default_factory=dict)  # file -> listed sha256

    @property
    def architecture(self) -> str:
        return config_architecture(self.config)


def matrix(shape: Sequence[int], itemsize: int) -> Tuple[int, int]:
    """(rows, row bytes) of the byte matrix G of a tensor."""
    return (shape[0], _numel(shape[1:]) * itemsize) if shape else (1, itemsize)


def _col_unit(shape: Sequence[int], itemsize: int) -> int:
    """Bytes of G per index along dim 1."""
    return _numel(shape[2:]) * itemsize


def supported(p: Placement, shape: Sequence[int]) -> bool:
    """Layouts this module copies: whole, split on dim 0, or split on dim 1 of a >= 2-d tensor."""
    return p.replicated or (p.split_dim == 0 and len(shape) >= 1) or \
        (p.split_dim == 1 and len(shape) >= 2)


def bands(p: Placement, shape: Sequence[int], itemsize: int, tp: int, rank: int
          ) -> Tuple[List[Band], List[Band]]:
    """(row bands, column bands) of G that rank `rank` of `tp` holds, in storage order."""
    rows, width = matrix(shape, itemsize)
    if p.replicated or tp == 1:
        return [(0, rows)], [(0, width)]
    ranges = shard_ranges(p, shape, tp, rank)
    if p.split_dim == 0:
        return ranges, [(0, width)]
    unit = _col_unit(shape, itemsize)
    return [(0, rows)], [(a * unit, b * unit) for a, b in ranges]


def _stored_blocks(p: Placement, shape, itemsize, stored: List[Tuple[Path, int]]
                   ) -> List[Block]:
    """Blocks of a tensor whose rank r's slice (layout.shard) starts at stored[r]."""
    rows, width = matrix(shape, itemsize)
    if p.replicated or len(stored) == 1:
        path, off = stored[0]
        return [Block(path, off, width, (0, rows), (0, width))]
    tp = len(stored)
    local_width = matrix(p.shard_shape(shape, tp), itemsize)[1]
    unit = _col_unit(shape, itemsize)
    blocks = []
    for r, (path, off) in enumerate(stored):
        pos = 0  # index along the split dim inside rank r's slice
        for a, b in shard_ranges(p, shape, tp, r):
            if p.split_dim == 0:
                blocks.append(Block(path, off + pos * width, width, (a, b), (0, width)))
            else:
                blocks.append(Block(path, off + pos * unit, local_width, (0, rows),
                                    (a * unit, b * unit)))
            pos += b - a
    return sorted(blocks, key=lambda k: (k.rows[0], k.cols[0]))


# ----------------------------------------------------------------------------------- sources

# Names that other readers' sniff() look for in a folder (megatron: tracker, mp_rank_XX,
# iter_/release; deepspeed: latest, global_stepN, *model_states.pt / zero_pp_rank_*;
# ds_inference_config.json). A folder holding any of them is left to the full reader chain.
_FOREIGN_MARKS = ("latest", "mp_rank_", "iter_", "release", "global_step", "model_states",
                  "zero_pp_rank", "ds_inference_config", "optim_states")


def open_source(path: Path, fmt: Optional[str] = None) -> Optional[ByteCheckpoint]:
    """The source as byte-located tensors, or None where only the tensor readers apply
    (pickled weights, other formats, dtypes or layouts outside this module). Errors in the
    files are the same CheckpointErrors the tensor readers raise."""
    path = Path(path)
    if fmt not in (None, "dsinfer", "hf") or not path.exists():
        return None
    if fmt in (None, "dsinfer") and dsinfer_format.sniff(path):
        return _open_dsinfer(path)
    if fmt == "hf" or (fmt is None and path.is_dir() and _plain_hf_folder(path)):
        return _open_hf(path) if hf.sniff(path) else None
    return None


def _plain_hf_folder(path: Path) -> bool:
    return not any(m in c.name for c in path.iterdir() for m in _FOREIGN_MARKS)


def _open_hf(path: Path) -> Optional[ByteCheckpoint]:
    # the same checks in the same order as hf.read / hf.read_files
    files = hf._weight_files(path)
    config, extra = hf.read_config(path), find_extra_files(path)
    tensors: List[ByteTensor] = []
    seen = set()
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: weight file listed in the index is missing; copy "
                                  "the complete checkpoint")
        if f.suffix != ".safetensors":
            return None
        st = SafetensorsFile(f)
        for name in st.names():
            if name in seen:
                raise CheckpointError(f"{f}: tensor '{name}' appears in two weight files")
            seen.add(name)
            shape, code = st.shape(name), st.dtype_code(name)
            blocks = _stored_blocks(Placement(None), shape, DTYPE_INFO[code][1],
                                    [(f, st.byte_range(name)[0])])
            tensors.append(ByteTensor(name, shape, code, blocks))
    if not tensors:
        raise CheckpointError(f"{files[0] if files else '?'}: no tensors found")
    return ByteCheckpoint("hf", config, tensors, extra, {"format": "hf", "tp_size": 1})


def _open_dsinfer(path: Path) -> Optional[ByteCheckpoint]:
    root, manifest = dsinfer_format.load_manifest(path)
    tp = manifest["tp_size"]
    files = dsinfer_format.RankFiles(root, manifest)
    tensors = []
    for name, info in manifest["tensors"].items():
        code, shape, p = CODE_OF_NAME.get(info["dtype"]), tuple(info["shape"]), \
            Placement.from_json(info)
        if code is None or not supported(p, shape):
            return None
        stored = []
        for r in range(tp):  # every rank's header is checked, as the tensor reader does
            f = files.get(r, info.get("part", 0))
            files.check(f, name)
            stored.append((f.path, f.byte_range(name)[0]))
        tensors.append(ByteTensor(name, shape, code,
                                  _stored_blocks(p, shape, DTYPE_INFO[code][1], stored)))
    config = dsinfer_format.read_config(root)
    config.setdefault("architectures", [manifest["architecture"]])
    extra = find_extra_files(root)
    return ByteCheckpoint("dsinfer", config, tensors, extra, {"format": "dsinfer", "tp_size": tp},
                          manifest, source_hashes(root, manifest))


def source_hashes(root: Path, manifest: dict) -> Dict[Path, str]:
    """{file: sha256} for the files of a dsinfer folder that a reshard reads: every rank file
    and the config/tokenizer files it copies."""
    copied = set(find_extra_files(root))
    return {root / rel: info["sha256"] for rel, info in manifest["files"].items()
            if "/" in rel or (rel in copied and (root / rel).is_file())}


# ----------------------------------------------------------------------------------- plans

@dataclasses.dataclass
class OutFile:
    """One output safetensors file: its tensors in file order, each with the bands of G it
    holds (an entry's shape is the slice's shape)."""
    rel: str
    metadata: Optional[Dict[str, str]]
    items: List[Tuple[ByteTensor, Tuple[int, ...], List[Band], List[Band]]]

    @property
    def nbytes(self) -> int:
        return sum(_numel(s) * t.itemsize for t, s, _, _ in self.items)


def dsinfer_files(ckpt: ByteCheckpoint, tp: int, placements: Dict[str, Placement],
                  max_part_bytes: int) -> Tuple[List[OutFile], Dict[str, int]]:
    """The rank files of a dsinfer output (same parts and order as dsinfer_format.write)."""
    shapes = {t.name: placements[t.name].shard_shape(t.shape, tp) for t in ckpt.tensors}
    shard_bytes = {t.name: _numel(shapes[t.name]) * t.itemsize for t in ckpt.tensors}
    parts = dsinfer_format._plan_parts(ckpt.tensors, shard_bytes, max_part_bytes)
    out = []
    for part in sorted(set(parts.values())):
        for r in range(tp):
            items = [(t, shapes[t.name], *bands(placements[t.name], t.shape, t.itemsize, tp, r))
                     for t in ckpt.tensors if parts[t.name] == part]
            out.append(OutFile(dsinfer_format.part_path(r, tp, part), None, items))
    return out, parts


def hf_files(ckpt: ByteCheckpoint, max_shard_bytes: int) -> Tuple[List[OutFile], list]:
    """The weight files of an HF output (same sharding and order as hf.write)."""
    shards = hf._plan_shards(ckpt.tensors, {t.name: t.code for t in ckpt.tensors},
                             max_shard_bytes, itemsize=lambda code: DTYPE_INFO[code][1])
    out = [OutFile(name, {"format": "pt"},
                   [(t, t.shape, *bands(Placement(None), t.shape, t.itemsize, 1, 0))
                    for t in shard])
           for name, shard in zip(hf.shard_names(len(shards)), shards)]
    return out, shards


# ----------------------------------------------------------------------------------- copying

class _Stopped(Exception):
    """Another job failed: this one ends early (its error is not the one reported)."""


class _Sources:
    """A job's read-only descriptors of source files, and windows mapped from them."""

    def __init__(self):
        self.fds: Dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return self.fds[path]

    def with_view(self, path: Path, start: int, length: int, fn: Callable[[memoryview], None]
                  ) -> None:
        """fn(bytes [start, start + length) of `path`), mapped, not copied; unmapped after."""
        base = start - start % PAGE
        m = mmap.mmap(self.fd(path), start + length - base, mmap.MAP_SHARED, mmap.PROT_READ,
                      offset=base)
        try:
            whole = memoryview(m)
            part = whole[start - base:]
            fn(part)
            part.release()
            whole.release()
        finally:
            try:
                m.close()
            except BufferError:  # fn failed and a traceback still holds a view: the
                pass             # mapping goes when that is collected

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _writeback_fn():
    """libc sync_file_range (start writeback of a range, don't wait), or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _writeback_fn()
_SYNC_FILE_RANGE_WRITE = 2
ALIGN = 4096  # O_DIRECT: buffer address, file offset and length in multiples of this


def _open_output(path: Path) -> Tuple[int, bool]:
    """(fd, direct?): O_DIRECT where the file system takes it (tmpfs does not)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    if DIRECT and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o666), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o666), False


class _Sink:
    """Appends bytes to an output file, hashing them on the way.

    Direct mode (O_DIRECT): bytes are gathered into two page-aligned staging buffers of CHUNK
    bytes taken in turn; a full one is written (whole aligned blocks, bypassing the page
    cache) by the sink's writer thread while the job fills the other, so hashing and copying
    go on while the disk writes. On VMs where page-cache pages are costly to get this is about
    half the CPU of a buffered write plus its writeback. The last block is written padded,
    then the file is truncated to its size. Should the file system refuse an aligned direct
    write (EINVAL) or write short, the file goes on with buffered writes from where it stood.
    Buffered mode: plain writes; writeback starts every WRITEBACK bytes (sync_file_range).
    """

    def __init__(self, fd: int, direct: bool, stop: threading.Event,
                 progress: Callable[[int], None]):
        self.fd, self.direct, self.stop, self.progress = fd, direct, stop, progress
        self.hash = hashlib.sha256()
        self.bytes = 0        # bytes received (the file's size at the end)
        self.disk = 0         # bytes handed to write()
        self.flushed = 0      # buffered mode: writeback started up to here
        self.size = -(-CHUNK // ALIGN) * ALIGN
        self.stages = [mmap.mmap(-1, self.size) for _ in range(2)] if direct else []
        self.cur = self.fill = 0
        self.pending: Optional[cf.Future] = None   # the write of the other stage
        self.writer = cf.ThreadPoolExecutor(1, "dsinfer-write") if direct else None

    def __call__(self, view: memoryview) -> None:
        if self.stop.is_set():
            raise _Stopped()
        self.hash.update(view)
        n = view.nbytes
        if self.writer is not None:
            self._stage(view)
        else:
            self._write(view)
        self.bytes += n
        self.progress(n)

    def _stage(self, view: memoryview) -> None:
        import numpy as np
        src = np.frombuffer(view, np.uint8)
        pos = 0
        while pos < src.size:
            dst = np.frombuffer(self.stages[self.cur], np.uint8)
            k = min(src.size - pos, self.size - self.fill)
            np.copyto(dst[self.fill:self.fill + k], src[pos:pos + k])  # releases the GIL
            del dst
            self.fill, pos = self.fill + k, pos + k
            if self.fill == self.size:
                self._submit(self.size)
        del src

    def _submit(self, length: int) -> None:
        """Hands stage[:length] to the writer thread (after the previous write ended)."""
        self._wait()
        self.pending = self.writer.submit(self._write_stage, self.stages[self.cur], length)
        self.cur, self.fill = 1 - self.cur, 0

    def _write_stage(self, stage: mmap.mmap, length: int) -> None:
        with memoryview(stage) as whole:
            self._write(whole[:length])

    def _wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def _write(self, view: memoryview) -> None:
        done, n = 0, view.nbytes
        while done < n:
            try:
                k = os.write(self.fd, view[done:])
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                k = 0
            if k <= 0 and not self.direct:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += max(k, 0)
            self.disk += max(k, 0)
            if self.direct and (k <= 0 or k % ALIGN):
                self._to_buffered()
        if not self.direct and _SYNC_FILE_RANGE is not None and WRITEBACK \
                and self.disk - self.flushed >= WRITEBACK:
            _SYNC_FILE_RANGE(self.fd, self.flushed, self.disk - self.flushed,
                             _SYNC_FILE_RANGE_WRITE)
            self.flushed = self.disk

    def _to_buffered(self) -> None:
        import fcntl
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        os.lseek(self.fd, self.disk, os.SEEK_SET)
        self.direct = False

    def finish(self) -> None:
        """Writes what is staged, sets the exact size, fsyncs."""
        self._wait()
        if self.fill:
            tail = length = self.fill
            if self.direct:
                length = -(-tail // ALIGN) * ALIGN
                self.stages[self.cur][tail:length] = bytes(length - tail)
            self._submit(length)
            self._wait()
        if self.disk != self.bytes:
            os.ftruncate(self.fd, self.bytes)
        os.fsync(self.fd)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self._wait()
            except BaseException:  # the job's own error is the one reported
                pass
            self.writer.shutdown(wait=True)
            self.writer = None
        for stage in self.stages:
            try:
                stage.close()
            except BufferError:  # a failed write's traceback still holds a view of it:
                pass             # unmapped when that is collected
        self.stages = []


def _copy_tensor(t: ByteTensor, row_bands: List[Band], col_bands: List[Band], src: _Sources,
                 sink: _Sink) -> None:
    """Emits G[row bands][:, col bands] of `t` in row-major order."""
    rows, width = matrix(t.shape, t.itemsize)
    out_width = sum(b - a for a, b in col_bands)
    if not out_width:
        return
    for r0, r1 in row_bands:
        runs = _row_runs(t, r0, r1, width) if col_bands == [(0, width)] else None
        if runs is not None:  # whole rows: contiguous byte ranges of the source files
            for path, start, length in runs:
                for pos in range(start, start + length, CHUNK):
                    src.with_view(path, pos, min(CHUNK, start + length - pos), sink)
            continue
        step = max(1, CHUNK // max(width, out_width))
        for x in range(r0, r1, step):
            _gather(t, x, min(r1, x + step), col_bands, out_width, src, sink)


def _row_runs(t: ByteTensor, r0: int, r1: int, width: int
              ) -> Optional[List[Tuple[Path, int, int]]]:
    """Rows [r0, r1) as (file, offset, length) runs when whole-width blocks hold them."""
    runs, row = [], r0
    for b in t.blocks:
        if b.rows[1] <= row or b.rows[0] >= r1:
            continue
        if b.cols != (0, width) or b.stride != width or b.rows[0] > row:
            return None
        stop = min(r1, b.rows[1])
        runs.append((b.path, b.offset + (row - b.rows[0]) * width, (stop - row) * width))
        row = stop
    return runs if row == r1 else None


def _gather(t: ByteTensor, x: int, y: int, col_bands: List[Band], out_width: int,
            src: _Sources, sink: _Sink) -> None:
    """Rows [x, y) of G[:, col bands] gathered into one buffer, then emitted."""
    import numpy as np
    buf = np.empty((y - x, out_width), np.uint8)
    filled, o = 0, 0
    for ca, cb in col_bands:
        for b in t.blocks:
            ra, rb = max(x, b.rows[0]), min(y, b.rows[1])
            c0, c1 = max(ca, b.cols[0]), min(cb, b.cols[1])
            if ra >= rb or c0 >= c1:
                continue
            n, w = rb - ra, c1 - c0
            dst = buf[ra - x:rb - x, o + c0 - ca:o + c1 - ca]
            start = b.offset + (ra - b.rows[0]) * b.stride + (c0 - b.cols[0])

            def copy(view, dst=dst, n=n, w=w, stride=b.stride):
                np.copyto(dst, np.ndarray((n, w), np.uint8, view, 0, (stride, 1)))
            src.with_view(b.path, start, (n - 1) * b.stride + w, copy)
            filled += n * w
        o += cb - ca
    if filled != buf.size:
        raise RuntimeError(f"tensor '{t.name}': source blocks cover {filled} of {buf.size} "
                           "bytes of a slice")
    sink(memoryview(buf.reshape(-1)))


def _write_file(out: Path, job: OutFile, progress, stop: threading.Event) -> Tuple[str, dict]:
    head, total = header_bytes([(t.name, s, t.code) for t, s, _, _ in job.items], job.metadata)
    path = out / job.rel
    fd, direct = _open_output(path)
    src, sink = _Sources(), _Sink(fd, direct, stop, lambda n: None)
    try:
        sink(memoryview(head))
        sink.progress = progress  # counts tensor bytes only
        for t, _, rows, cols in job.items:
            _copy_tensor(t, rows, cols, src, sink)
        if sink.bytes != total:
            raise RuntimeError(f"{path}: wrote {sink.bytes} bytes, its header says {total}")
        sink.finish()
    finally:
        sink.close()
        src.close()
        os.close(fd)
    return job.rel, {"bytes": sink.bytes, "sha256": sink.hash.hexdigest()}


def _check_file(path: Path, want: str, stop: threading.Event) -> None:
    """sha256 of a source file against what its manifest lists."""
    h, src = hashlib.sha256(), _Sources()
    try:
        size = os.fstat(src.fd(path)).st_size
        for pos in range(0, size, CHUNK):
            if stop.is_set():
                raise _Stopped()
            src.with_view(path, pos, min(CHUNK, size - pos), h.update)
    finally:
        src.close()
    if h.hexdigest() != want:
        raise CheckpointError(f"{path}: sha256 mismatch with the source's "
                              f"{dsinfer_format.MANIFEST} (the file was modified or corrupted); "
                              "nothing was written: copy the source checkpoint again")


def check_files(hashes: Dict[Path, str], stop: Optional[threading.Event] = None,
                threads: int = 0) -> None:
    """Hashes source files against their listed sha256 (CheckpointError naming the first
    that differs)."""
    run_jobs([(_check_file, p, h) for p, h in hashes.items()], stop, threads)


def run_jobs(jobs: List[tuple], stop: Optional[threading.Event] = None, threads: int = 0
             ) -> list:
    """Runs (fn, *args, stop) jobs on a pool; the first failure stops the others and is
    raised once all have ended (no thread still writes when the caller cleans up)."""
    stop = stop or threading.Event()
    if not jobs:
        return []
    n = min(len(jobs), threads or THREADS or (os.cpu_count() or 1) + 1)
    with cf.ThreadPoolExecutor(n, thread_name_prefix="dsinfer-copy") as pool:
        futures = [pool.submit(fn, *args, stop) for fn, *args in jobs]
        try:
            for f in cf.as_completed(futures):
                if not isinstance(f.exception(), _Stopped):
                    f.result()
        except BaseException:
            stop.set()
            for f in futures:
                f.cancel()
            raise
    return [f.result() for f in futures]


def write_files(out: Path, files: List[OutFile], hashes: Dict[Path, str],
                progress: bool = True, desc: str = "write", threads: int = 0
                ) -> Dict[str, dict]:
    """Writes `files` under `out` and checks the source `hashes` alongside; returns
    {rel: {"bytes", "sha256"}} in the order of `files`."""
    bar, lock = None, threading.Lock()
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(f.nbytes for f in files), unit="B", unit_scale=True, desc=desc,
                   disable=None, leave=False)

    def tick(n: int) -> None:
        if bar is not None:
            with lock:
                bar.update(n)

    # biggest output files first (they bound the wall time); source checks interleaved
    writes = [(_write_file, out, f, tick) for f in sorted(files, key=lambda f: -f.nbytes)]
    checks = [(_check_file, p, h) for p, h in hashes.items()]
    jobs = [j for i in range(max(len(writes), len(checks))) for j in (writes[i:i + 1]
                                                                      + checks[i:i + 1])]
    try:
        results = run_jobs(jobs, threads=threads)
    finally:
        if bar is not None:
            bar.close()
    done = dict(r for r in results if r is not None)
    return {f.rel: done[f.rel] for f in files}
