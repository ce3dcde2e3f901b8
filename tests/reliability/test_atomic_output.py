"""Issue 6.2: output is atomic and resumable. kill -9 at several points of a conversion leaves
no complete-looking output and the same command then succeeds (cleaning the temporary); a
file-size limit (`ulimit -f`) or a full disk mid-write gives one line, exit 1 and no --out; a
read-only output folder is refused; --force replaces atomically and keeps the old output when
the new one fails."""
import os
import random
import resource
import subprocess
import time
from pathlib import Path

import pytest

import reliability_support as rs
from dsinfer.formats import atomic
from dsinfer.inspect import verify


def start(*argv, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([str(rs.BIN / "dsinfer-reshard"), *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def temporaries(out: Path) -> list:
    return sorted(out.parent.glob(f".{out.name}{atomic.TMP_TAG}*"))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else 0
    except FileNotFoundError:
        return 0


def written_bytes(out: Path) -> int:
    """Bytes in the temporary folders; the run renames them away at any moment, so a folder
    or file that vanishes mid-listing counts as 0 (the next poll sees the final state)."""
    total = 0
    for t in temporaries(out):
        try:
            total += sum(_size(p) for p in t.rglob("*"))
        except FileNotFoundError:
            pass
    return total


# kill point -> condition on the output's parent folder, polled every few ms
KILL_POINTS = {
    "while_starting": lambda out: False,          # killed by the delay below, before any write
    "temp_created": lambda out: bool(temporaries(out)),
    "mid_first_file": lambda out: written_bytes(out) > 8_000_000,
    "most_written": lambda out: written_bytes(out) > 90_000_000,
    "manifest_written": lambda out: any((t / "dsinfer.json").exists() for t in temporaries(out)),
}


def kill_at(proc: subprocess.Popen, out: Path, point, deadline: float) -> bool:
    """SIGKILL `proc` when `point(out)` holds or at `deadline`; False if it finished first."""
    while time.monotonic() < deadline and not point(out):
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    return True


def assert_nothing_or_complete(out: Path) -> str:
    """After a kill: no --out at all, or (the kill came after the rename) a complete one."""
    if not out.exists():
        return "absent"
    assert verify(out) == [], "a killed run left an incomplete output"
    return "complete"


def after_temp(delay: float):
    """Holds `delay` seconds after the temporary folder first appears (mid-conversion)."""
    seen = []

    def point(out):
        if not seen and temporaries(out):
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] >= delay
    return point


def cases():
    for name, cond in KILL_POINTS.items():
        yield pytest.param(cond, 0.3 if name == "while_starting" else 20.0, id=name)
    rng = random.Random(6)   # fixed seed: the same points every run, spread over the write
    for d in sorted(rng.uniform(0.05, 0.6) for _ in range(2)):
        yield pytest.param(after_temp(d), 20.0, id=f"temp_plus_{d:.2f}s")


@pytest.mark.parametrize("point,timeout", list(cases()))
def test_kill9_then_same_command_succeeds(point, timeout, big_hf, fresh):
    out = fresh / "out"
    argv = (big_hf, "--tp", 2, "--out", out, "--quiet")
    proc = start(*argv)
    killed = kill_at(proc, out, point, time.monotonic() + timeout)
    state = assert_nothing_or_complete(out)
    print(f"killed={killed} out={state} temporaries={len(temporaries(out))}")
    if not killed:  # it finished before the kill point: then it must have succeeded
        assert proc.returncode == 0 and state == "complete"
    if state == "complete":
        return
    o = rs.cli("reshard", *argv)        # the same command again
    assert o.code == 0, o.err
    assert verify(out) == [] and rs.leftovers(fresh) == []   # stale temporary cleaned


def test_kill9_during_force_keeps_the_old_output(big_hf, sources, fresh):
    out = fresh / "out"
    assert rs.cli("reshard", sources["gpt2"], "--tp", 2, "--out", out).code == 0
    old = rs.tree_hash(out)
    for point in ("temp_created", "mid_first_file", "most_written"):
        proc = start(big_hf, "--tp", 2, "--out", out, "--force", "--quiet")
        if not kill_at(proc, out, KILL_POINTS[point], time.monotonic() + 20):
            break   # finished: the new output replaced the old one
        assert rs.tree_hash(out) == old, point
    o = rs.cli("reshard", big_hf, "--tp", 2, "--out", out, "--force", "--quiet")
    assert o.code == 0 and verify(out) == [] and rs.leftovers(fresh) == []
    assert rs.tree_hash(out) != old


class Killed(BaseException):
    """Ends a run the way SIGKILL does: no handler of dsinfer's runs for it."""


def test_crash_between_the_two_renames_is_rolled_back(sources, fresh, monkeypatch):
    """Where the atomic exchange of two folders is not available, --force moves the old output
    aside and renames the new one in: a crash in between leaves the old one aside, and the
    next run on that --out puts it back before anything else."""
    out = fresh / "out"
    assert rs.cli("reshard", sources["gpt2"], "--tp", 2, "--out", out).code == 0
    old = rs.tree_hash(out)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def dies_on_second(a, b):
        calls.append(a)
        if len(calls) == 2:
            raise Killed()   # stands for SIGKILL between the renames
        real_rename(a, b)
    monkeypatch.setattr(atomic.os, "rename", dies_on_second)
    with pytest.raises(Killed):
        rs.cli("reshard", sources["gpt2"], "--tp", 1, "--out", out, "--force")
    monkeypatch.setattr(atomic.os, "rename", real_rename)
    assert not out.exists() and rs.leftovers(fresh)     # the window: old aside, new not in
    # the crashed process is "gone": pretend its pid is dead
    monkeypatch.setattr(atomic, "_pid_alive", lambda pid: False)
    atomic.clean_stale(out)
    assert rs.tree_hash(out) == old and rs.leftovers(fresh) == []


def test_force_replaces_with_an_atomic_exchange(sources, fresh, monkeypatch):
    out = fresh / "out"
    assert rs.cli("reshard", sources["gpt2"], "--tp", 2, "--out", out).code == 0
    renames = []
    monkeypatch.setattr(atomic.os, "rename", lambda a, b: renames.append((a, b)))
    o = rs.cli("reshard", sources["gpt2"], "--tp", 1, "--out", out, "--force")
    assert o.code == 0, o.err
    assert renames == []          # one renameat2(RENAME_EXCHANGE): --out never disappears
    assert (out / "rank-00-of-01").is_dir() and verify(out) == [] and rs.leftovers(fresh) == []


# ---- disk full, file-size limit, read-only ---------------------------------------------------

def _limit_file_size(nbytes: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


@pytest.mark.parametrize("tool,extra", [("reshard", ["--tp", "2"]),
                                        ("reshard", ["--tp", "1", "--to", "hf"]),
                                        ("quantize", ["--tp", "2", "--groups", "per-channel"])])
def test_file_size_limit_mid_write(tool, extra, sources, fresh):
    """`ulimit -f 64` (64 KiB): the first rank file outgrows it half-way."""
    out = fresh / "out"
    o = rs.console(tool, sources["llama"], "--out", out, *extra,
                   preexec_fn=_limit_file_size(64 * 1024))
    rs.assert_one_line(o, str(out), "file-size limit", "File too large", "nothing was written")
    assert not out.exists() and rs.leftovers(fresh) == []


def test_file_size_limit_during_force_keeps_the_old_output(sources, fresh):
    out = fresh / "out"
    assert rs.cli("reshard", sources["gpt2"], "--tp", 2, "--out", out).code == 0
    old = rs.tree_hash(out)
    o = rs.console("reshard", sources["llama"], "--tp", 2, "--out", out, "--force",
                   preexec_fn=_limit_file_size(64 * 1024))
    rs.assert_one_line(o, "file-size limit")
    assert rs.tree_hash(out) == old and rs.leftovers(fresh) == []


@pytest.fixture
def small_tmpfs(fresh):
    """A 256 KiB tmpfs (a disk that fills up), where this machine lets us mount one."""
    mnt = fresh / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the file-size limit test covers it")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_mid_write(sources, small_tmpfs):
    out = small_tmpfs / "out"
    o = rs.cli("reshard", sources["llama"], "--tp", 2, "--out", out)
    rs.assert_one_line(o, str(out), "out of disk space", "No space left", "nothing was written")
    assert not out.exists() and rs.leftovers(small_tmpfs) == []
    assert not any(small_tmpfs.iterdir())          # every byte given back


@pytest.fixture
def read_only_dir(fresh):
    """A read-only folder: a read-only tmpfs where mount works (root ignores chmod), else /sys."""
    mnt = fresh / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        yield Path("/sys/dsinfer-read-only")
        return
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_read_only_output_folder(sources, read_only_dir):
    out = read_only_dir / "out"
    o = rs.cli("reshard", sources["gpt2"], "--tp", 2, "--out", out)
    rs.assert_one_line(o, "cannot create the output there", "choose a writable --out")
    assert not out.exists()


def test_failed_force_keeps_the_old_output(sources, fresh):
    out = fresh / "out"
    assert rs.cli("reshard", sources["gpt2"], "--tp", 2, "--out", out).code == 0
    old = rs.tree_hash(out)
    o = rs.cli("reshard", sources["gpt2"], "--tp", 3, "--out", out, "--force")
    rs.assert_one_line(o, "8 attention heads")
    assert rs.tree_hash(out) == old and rs.leftovers(fresh) == []


def _open_files_under(folder: Path) -> list:
    fds = Path("/proc/self/fd")
    return [os.readlink(p) for p in fds.iterdir()
            if str(folder) in (os.readlink(p) if p.is_symlink() else "")]


@pytest.mark.parametrize("to", ["dsinfer", "hf"])
def test_failure_mid_write_releases_files_and_threads(to, sources, fresh):
    """A source tensor that fails half-way through (after files are open) leaves no writer
    thread and no open file behind in this process (a library user's, not only the CLI's)."""
    import threading
    from dsinfer.formats import CheckpointError, TensorRef
    from dsinfer.reshard import Target, open_source, write
    ckpt, spec = open_source(sources["gpt2"])

    def bad():
        raise CheckpointError("source tensor unreadable")
    victim = ckpt.tensors[len(ckpt.tensors) // 2]
    ckpt.tensors[len(ckpt.tensors) // 2] = TensorRef(victim.name, victim.shape, victim.dtype, bad)
    threads = threading.active_count()
    with pytest.raises(CheckpointError, match="unreadable"):
        write(ckpt, spec, Target(fresh / "out", 2 if to == "dsinfer" else 1, to, progress=False),
              sources["gpt2"])
    assert threading.active_count() == threads
    assert _open_files_under(fresh) == [] and not (fresh / "out").exists()
    assert rs.leftovers(fresh) == []
