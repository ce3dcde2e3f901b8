"""Atomic output directories: everything is written into a hidden temporary sibling, fsync'ed,
then renamed into place in one step. An interrupted run never leaves a folder at the target
path; its temporary is removed by the next run that writes there."""
from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Optional

from .errors import CheckpointError

TMP_TAG = ".dsinfer-tmp-"
OLD_TAG = ".dsinfer-old-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> None:
    """Remove temporaries of earlier runs on `out` whose process is gone."""
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{out.name}{TMP_TAG}*"):
        pid = p.name[len(f".{out.name}{TMP_TAG}"):].split("-")[0]
        if not pid.isdigit() or not _pid_alive(int(pid)) or int(pid) == os.getpid():
            shutil.rmtree(p, ignore_errors=True)
    for p in out.parent.glob(f".{out.name}{OLD_TAG}*"):
        shutil.rmtree(p, ignore_errors=True)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


class AtomicDir:
    """`with AtomicDir(out, force) as tmp:` write into tmp; on success it becomes `out`."""

    def __init__(self, out: Path, force: bool = False, protect: Iterable[Path] = ()):
        self.out = Path(out)
        for src in protect:
            if _overlaps(self.out, Path(src)):
                raise CheckpointError(f"{self.out}: output overlaps the source {src}; choose an "
                                      "--out outside the source (the source is never modified)")
        if self.out.exists() and not force:
            raise CheckpointError(f"{self.out}: already exists; pass --force to replace it, or "
                                  "choose another --out")
        if self.out.exists() and not self.out.is_dir():
            raise CheckpointError(f"{self.out}: exists and is not a directory; remove it or "
                                  "choose another --out")
        self.tmp: Optional[Path] = None

    def __enter__(self) -> Path:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            clean_stale(self.out)
            self.tmp = self.out.parent / f".{self.out.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self.tmp.mkdir()
        except OSError as e:
            raise CheckpointError(f"{self.out.parent}: cannot create the output there "
                                  f"({os.strerror(e.errno) if e.errno else e}); choose a "
                                  "writable --out") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise CheckpointError(f"{self.out}: out of disk space or over the file-size "
                                      f"limit while writing ({os.strerror(exc.errno)}); nothing "
                                      "was written: free space and run again") from None
            if isinstance(exc, OSError):
                raise CheckpointError(f"{self.out}: write failed ({exc}); nothing was "
                                      "written") from None
            return False
        self._commit()
        return False

    def _commit(self) -> None:
        for p in self.tmp.rglob("*"):
            fsync_path(p)  # files and sub-folders (their entries)
        fsync_path(self.tmp)
        old = None
        if self.out.exists():  # --force: move the old one aside, then swap in the new one
            old = self.out.parent / f".{self.out.name}{OLD_TAG}{os.getpid()}"
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        fsync_path(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
