"""Issue 6.6: a rank that fails makes every rank exit non-zero within a bounded time, and the
failing rank's message is shown once. Rank 1 fails inside init_inference while rank 0 waits in
a collective: by raising (its rank file is missing; the launcher stops rank 0) or by hanging
(the process-group timeout, DSINFER_TIMEOUT, ends rank 0's wait; the launcher stops rank 1)."""
import os
from pathlib import Path

import pytest

import reliability_support as rs

MISSING = rs.MISSING
launch = rs.launch_faulty


def ckpt_of(logdir: Path) -> Path:
    return logdir.parent / "ckpt"


def assert_all_ranks_gone(logdir: Path):
    for rank in (0, 1):
        pid = int((logdir / f"pid.{rank}").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert not (logdir / f"done.{rank}").exists()


def test_rank_raises_while_rank0_waits_in_a_collective(sources, root, memo):
    r, seconds, logdir = rs.rank_raise_result(sources, root, memo)
    print(f"stopped after {seconds:.1f} s")
    assert (logdir / "collective.0").exists()         # rank 0 was waiting in a collective
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.count(MISSING) == 1, r.stderr[-3000:]   # the cause, shown once,
    assert f"[rank1]: dsinfer: error: {ckpt_of(logdir)}/{MISSING}" in r.stderr  # one line
    assert "[rank1]: Traceback" not in r.stderr                                  # no traceback
    assert "dsinfer: rank 1 (local rank 1" in r.stderr and "stopped all other ranks" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("dsinfer: ")
    assert_all_ranks_gone(logdir)
    assert seconds < 60     # far below the 300 s process-group timeout: the launcher stops rank 0


def test_rank_hangs_and_the_group_timeout_ends_the_wait(sources, fresh):
    ckpt = sources["llama_tp2"]
    logdir = fresh / "log"
    logdir.mkdir()
    r, seconds = launch("hang", ckpt, logdir, timeout_env=10, limit=150)
    print(f"stopped after {seconds:.1f} s")
    assert (logdir / "collective.0").exists()
    assert r.returncode != 0
    assert "dsinfer: rank 0 (local rank 0" in r.stderr, r.stderr[-3000:]  # rank 0 timed out
    assert_all_ranks_gone(logdir)
    assert 10 <= seconds < 90
