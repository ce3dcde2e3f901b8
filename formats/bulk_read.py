"""Reads whole safetensors files straight into device memory, fast.

One device buffer per file receives the file's tensor bytes. Worker threads `pread` chunks
into pinned host staging buffers (the GIL is released during the read) and each queues an
asynchronous host-to-device copy on its own CUDA stream, so disk/page-cache reads, and PCIe
copies overlap. Tensors are then views into the device buffer (or aligned copies where a
tensor's byte offset does not suit its dtype). On a CPU device the same code reads into one
host buffer per file, without pinning or streams.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from .errors import CheckpointError
from .safetensors_io import DTYPES, SafetensorsFile

# Bytes per read / copy. Each thread pins two staging buffers of this size, and pinning host
# memory (cudaHostAlloc) is paid before the first byte moves. On two H200s (Llama-7B at TP 2,
# 6.7 GB a rank, warm page cache, 28 Nov 2026) the last chunk left the files after 0.29-0.52 s
# at 8 MB (pinning 0.15-0.49 s summed over 8 threads), 0.48-0.60 s at 16 MB (0.56-0.89 s),
# and 4 MB pinned less but finished its device copies ~0.3 s later.
CHUNK = int(os.environ.get("DSINFER_READ_CHUNK_MB", "8")) << 20
THREADS = int(os.environ.get("DSINFER_READ_THREADS", "8"))


class _Worker:
    """A thread's two pinned staging buffers and its CUDA stream (double buffering)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        pin = self.cuda
        self.bufs = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.events = [None, None]
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.turn = 0

    def copy(self, fd: int, offset: int, n: int, dst: torch.Tensor, path) -> None:
        i, self.turn = self.turn, 1 - self.turn
        if self.events[i] is not None:
            self.events[i].synchronize()   # the copy out of this staging buffer is done
        view = memoryview(self.bufs[i].numpy())[:n]
        got = 0
        while got < n:
            k = os.preadv(fd, [view[got:]], offset + got)
            if k <= 0:
                raise CheckpointError(f"{path}: truncated while reading; copy it again")
            got += k
        if not self.cuda:
            dst.copy_(self.bufs[i][:n])
            return
        with torch.cuda.stream(self.stream):
            dst.copy_(self.bufs[i][:n], non_blocking=True)
            self.events[i] = torch.cuda.Event()
            self.events[i].record(self.stream)

    def finish(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


def _jobs(files: List[SafetensorsFile], buffers) -> List[Tuple]:
    out = []
    for f, buf in zip(files, buffers):
        size = buf.numel()
        for start in range(0, size, CHUNK):
            out.append((f, start, min(CHUNK, size - start), buf))
    return out


class DeviceRead:
    """A read of whole files into `device` memory, running on worker threads from the moment it
    is made (so the caller can do other work meanwhile, e.g. set up NCCL); `result()` waits
    for it and gives {tensor name: tensor}. `stats` then holds its timings and sizes."""

    def __init__(self, paths: List[Path], device, threads: int = THREADS):
        t0 = time.perf_counter()
        self.device = torch.device(device)
        self.files = [SafetensorsFile(p) for p in paths]
        sizes = [os.path.getsize(f.path) - f.data_start for f in self.files]
        self.buffers = [torch.empty(n, dtype=torch.uint8, device=self.device) for n in sizes]
        self.fds = {f.path: os.open(f.path, os.O_RDONLY) for f in self.files}
        self.workers: Dict[int, _Worker] = {}
        self.tensors = None
        # read_s runs until result() is called (the caller may be busy with other work, e.g.
        # the NCCL set-up); host_done_s is when the last chunk left the file, so a read that
        # finished early shows as host_done_s < read_s (its device copies end a chunk later)
        self.stats = {"bytes": sum(sizes), "threads": threads, "chunk_mb": CHUNK / 2 ** 20,
                      "start_s": 0.0, "pin_s": 0.0, "host_done_s": 0.0, "read_s": 0.0}
        self._lock = threading.Lock()
        self._t0 = t0
        self.pool = cf.ThreadPoolExecutor(threads)
        self.futures = [self.pool.submit(self._run, job)
                        for job in _jobs(self.files, self.buffers)]
        self.stats["start_s"] = time.perf_counter() - t0

    def _run(self, job) -> None:
        f, start, n, buf = job
        w = self.workers.get(threading.get_ident())
        if w is None:
            t = time.perf_counter()
            w = self.workers[threading.get_ident()] = _Worker(self.device)
            self.stats["pin_s"] += time.perf_counter() - t      # summed over threads
        w.copy(self.fds[f.path], f.data_start + start, n, buf[start:start + n], f.path)
        done = time.perf_counter() - self._t0
        with self._lock:
            self.stats["host_done_s"] = max(self.stats["host_done_s"], done)

    def result(self) -> Dict[str, torch.Tensor]:
        if self.tensors is None:
            try:
                for fut in self.futures:
                    fut.result()
                for w in self.workers.values():
                    w.finish()
            finally:
                self.pool.shutdown(wait=True, cancel_futures=True)
                for fd in self.fds.values():
                    os.close(fd)
                self.fds = {}
            self.stats["read_s"] = time.perf_counter() - self._t0
            self.tensors = {name: _tensor(buf, e) for f, buf in zip(self.files, self.buffers)
                            for name, e in f.entries.items()}
            self.buffers = []
        return self.tensors


def read_to_device(paths: List[Path], device, threads: int = THREADS
                   ) -> Dict[str, torch.Tensor]:
    """{tensor name: tensor on `device`} for every tensor of every file in `paths`."""
    return DeviceRead(paths, device, threads).result()


def _tensor(buf: torch.Tensor, entry: dict) -> torch.Tensor:
    dtype = DTYPES[entry["dtype"]]
    begin, end = entry["data_offsets"]
    raw = buf[begin:end]
    if begin % dtype.itemsize:
        raw = raw.clone()   # misaligned for this dtype: an aligned copy (device to device)
    return raw.view(dtype).reshape(entry["shape"])
