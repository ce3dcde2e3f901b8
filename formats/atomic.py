"""Atomic output directories: everything is written into a hidden temporary sibling, fsync'ed,
then renamed into place in one step. An interrupted run never leaves a folder at the target
path; its temporary is removed by the next run that writes there. Replacing an existing folder
(--force) swaps the two in one step where the OS can (Linux renameat2 RENAME_EXCHANGE); else
the old folder is moved aside first, and a run killed in between gets it back on the next run."""
from __future__ import annotations

import ctypes
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


def _stale(p: Path, prefix: str) -> bool:
    pid = p.name[len(prefix):].split("-")[0]
    return not pid.isdigit() or not _pid_alive(int(pid)) or int(pid) == os.getpid()


def clean_stale(out: Path) -> None:
    """Remove temporaries of earlier runs on `out` whose process is gone; an old output that a
    killed --force run had moved aside, with nothing in its place, is put back."""
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{out.name}{TMP_TAG}*"):
        if _stale(p, f".{out.name}{TMP_TAG}"):
            shutil.rmtree(p, ignore_errors=True)
    for p in out.parent.glob(f".{out.name}{OLD_TAG}*"):
        if _stale(p, f".{out.name}{OLD_TAG}"):
            if not os.path.lexists(out):
                os.rename(p, out)
            else:
                shutil.rmtree(p, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the
    OS or file system cannot."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


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
        self.out, self.force = Path(out), force
        for src in protect:
            if _overlaps(self.out, Path(src)):
                raise CheckpointError(f"{self.out}: output overlaps the source {src}; choose an "
                                      "--out outside the source (the source is never modified)")
        self._check_existing()
        self.tmp: Optional[Path] = None

    def _check_existing(self) -> None:
        if self.out.exists() and not self.force:
            raise CheckpointError(f"{self.out}: already exists; pass --force to replace it, or "
                                  "choose another --out")
        if self.out.exists() and not self.out.is_dir():
            raise CheckpointError(f"{self.out}: exists and is not a directory; remove it or "
                                  "choose another --out")

    def __enter__(self) -> Path:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            clean_stale(self.out)
            self._check_existing()  # clean_stale may have put back an old output
            self.tmp = self.out.parent / f".{self.out.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self.tmp.mkdir()
        except OSError as e:
            raise CheckpointError(f"{self.out.parent}: cannot create the output there "
                                  f"({os.strerror(e.errno) if e.errno else e}); choose a "
                                  "writable --out") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                self._commit()
                return False
            except (OSError, CheckpointError) as e:
                exc = e
        shutil.rmtree(self.tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise CheckpointError(f"{self.out}: out of disk space or over the file-size "
                                  f"limit while writing ({os.strerror(exc.errno)}); nothing "
                                  "was written: free space and run again") from None
        if isinstance(exc, OSError):
            raise CheckpointError(f"{self.out}: write failed ({exc}); nothing was "
                                  "written") from None
        if isinstance(exc, CheckpointError) and exc_type is None:
            raise exc
        return False

    def _commit(self) -> None:
        for p in self.tmp.rglob("*"):
            fsync_path(p)  # files and sub-folders (their entries)
        fsync_path(self.tmp)
        self._check_existing()  # another run may have written --out meanwhile
        old = None
        if self.out.exists():  # --force: swap the new one in; the old one ends up at tmp
            if _exchange(self.tmp, self.out):
                old = self.tmp
            else:  # move the old one aside, then rename the new one in (clean_stale undoes
                old = self.out.parent / f".{self.out.name}{OLD_TAG}{os.getpid()}"  # a crash)
                os.rename(self.out, old)
        if old != self.tmp:
            try:
                os.rename(self.tmp, self.out)
            except OSError:
                if old is not None:
                    os.rename(old, self.out)
                raise
        fsync_path(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
