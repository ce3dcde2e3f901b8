"""The `dsinfer` launcher as a user runs it (`python -m dsinfer ...` in a subprocess, CPU only):
rank environment, gloo collectives, argument pass-through, one-line failure reports, no hangs."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch

from dsinfer.tools import launch

TIMEOUT = 60  # s; a launcher that hangs fails the test instead of the suite

# Each rank writes what it saw to rank-<RANK>.json; the all_reduce sums RANK + 1 over the world.
REPORT = """
import json, os, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
env = {k: os.environ[k] for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
with open(f"rank-{os.environ['RANK']}.json", "w") as f:
    json.dump({"env": env, "sum": t.item(), "argv": sys.argv[1:]}, f)
dist.destroy_process_group()
"""

# No torch in the children: a rank's start-up is then ~0.1 s instead of ~2 s.
ARGV = """
import json, os, sys
with open(f"rank-{os.environ['RANK']}.json", "w") as f:
    json.dump({"argv": sys.argv[1:], "port": os.environ["MASTER_PORT"]}, f)
"""

# Rank 0 waits (300 s); rank 1 fails once rank 0 is surely running, so the launcher must stop it.
FAIL = """
import os, time
if os.environ["RANK"] == "0":
    with open("rank-0.pid.tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace("rank-0.pid.tmp", "rank-0.pid")  # whole, so rank 1 never reads it half-written
    time.sleep(300)
while not os.path.exists("rank-0.pid"):
    time.sleep(0.05)
raise ValueError("boom on rank 1")
"""


def _launch(tmp_path, *argv, timeout=TIMEOUT):
    env = {k: v for k, v in os.environ.items() if k not in ("LOGLEVEL", "RANK", "WORLD_SIZE")}
    return subprocess.run([sys.executable, "-m", "dsinfer", *map(str, argv)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _script(tmp_path, text, name="script.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _reports(tmp_path, world):
    return [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(world)]


def _dsinfer_lines(stderr):
    return [ln for ln in stderr.splitlines() if ln.startswith("dsinfer")]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SCRIPT_ARGS = ["a", "--b", "c d", "--num_procs", "9"]  # after the script: the script's, not ours


@pytest.fixture(scope="module", params=[2, 4])
def ran(request, tmp_path_factory):
    """One launch per world size, shared by the tests below (each launch costs seconds)."""
    world, tmp = request.param, tmp_path_factory.mktemp(f"world{request.param}")
    # --num_gpus on a machine without GPUs also exercises the CPU fallback
    how = "--num_procs" if torch.cuda.is_available() else "--num_gpus"
    res = _launch(tmp, how, world, _script(tmp, REPORT), *SCRIPT_ARGS)
    assert res.returncode == 0, res.stderr
    return SimpleNamespace(world=world, stderr=res.stderr, reports=_reports(tmp, world))


def test_ranks_env_and_gloo_all_reduce(ran):
    for r, rep in enumerate(ran.reports):
        assert rep["env"]["RANK"] == rep["env"]["LOCAL_RANK"] == str(r)
        assert rep["env"]["WORLD_SIZE"] == str(ran.world)
        assert rep["sum"] == ran.world * (ran.world + 1) / 2
    # one free port chosen for the job, the same for every rank
    assert len({rep["env"]["MASTER_PORT"] for rep in ran.reports}) == 1


def test_script_args_pass_through(ran):
    for r, rep in enumerate(ran.reports):
        assert rep["argv"] == [f"--local_rank={r}", *SCRIPT_ARGS]  # as DeepSpeed's launcher passes them


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU fallback")
def test_num_gpus_without_gpus_runs_cpu_processes(ran):
    notice = f"dsinfer: no GPU on this machine; running {ran.world} CPU processes (gloo)"
    assert _dsinfer_lines(ran.stderr) == [notice], ran.stderr


def test_module_master_port_no_local_rank(tmp_path):
    (tmp_path / "pkg").mkdir()
    _script(tmp_path, ARGV, "pkg/__main__.py")
    port = _free_port()
    res = _launch(tmp_path, "--num_procs", 2, "--master_port", port, "--no_local_rank", "-m", "pkg", "x")
    assert res.returncode == 0, res.stderr
    assert [rep["argv"] for rep in _reports(tmp_path, 2)] == [["x"], ["x"]]
    assert {rep["port"] for rep in _reports(tmp_path, 2)} == {str(port)}


def test_failing_rank_stops_all_and_is_named(tmp_path):
    script = _script(tmp_path, FAIL)
    start = time.monotonic()
    res = _launch(tmp_path, "--num_procs", 2, script)
    assert time.monotonic() - start < 30, "rank 0 was not stopped"  # it sleeps 300 s
    assert res.returncode == 1, res.stderr
    pid = int((tmp_path / "rank-0.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    lines = _dsinfer_lines(res.stderr)
    assert len(lines) == 1 and lines[0].startswith("dsinfer: rank 1 ") and "exit code 1" in lines[0], res.stderr
    # the child's own traceback stays visible; torchrun's summary and logs do not show
    assert "ValueError: boom on rank 1" in res.stderr and res.stderr.count("Traceback") == 1, res.stderr
    for noise in ("ChildFailedError", "torch/distributed/elastic", "Root Cause"):
        assert noise not in res.stderr, res.stderr


def test_missing_script(tmp_path):
    res = _launch(tmp_path, "--num_procs", 2, tmp_path / "nope.py", "--x")
    assert res.returncode == 2
    assert res.stderr.strip() == f"dsinfer: error: script not found: {tmp_path / 'nope.py'}"


@pytest.mark.parametrize("argv, needle", [
    (["--num_procs", "0", "s.py"], "--num_procs/--num-procs: must be 1 or more, got 0"),
    (["--num_gpus", "-1", "s.py"], "must be 1 or more, got -1"),
    (["-m", "no_such_module_xyz"], "module not found: no_such_module_xyz"),
    (["--hostfile", "hosts", "s.py"], "--hostfile is a DeepSpeed (pdsh) launcher option"),
    (["--nnodes", "2", "s.py"], "--nnodes 2 needs --master_addr"),
])
def test_bad_command_lines(tmp_path, argv, needle):
    (tmp_path / "s.py").write_text("")
    res = _launch(tmp_path, *argv)
    assert res.returncode == 2
    assert needle in _dsinfer_lines(res.stderr)[-1], res.stderr


def test_help(tmp_path):
    res = _launch(tmp_path, "--help")
    assert res.returncode == 0
    for needle in ("--num_gpus", "--num_procs", "--master_port", "--nnodes", "examples:"):
        assert needle in res.stdout


# ---- in-process: the decisions, without starting processes ----

def _args(**kw):
    return SimpleNamespace(**{"num_gpus": None, "num_procs": None, **kw})


@pytest.mark.parametrize("kw, gpus, want", [
    ({}, 0, 1), ({}, 4, 4), ({"num_gpus": 2}, 4, 2), ({"num_gpus": 3}, 0, 3),
    ({"num_procs": 8}, 2, 8), ({"num_procs": 3}, 0, 3),
])
def test_procs_per_node(kw, gpus, want):
    assert launch._procs_per_node(_args(**kw), gpus) == want


def test_more_gpus_than_present_names_both_numbers():
    with pytest.raises(launch.UsageError, match=r"--num_gpus 8 but this machine has 2 GPU"):
        launch._procs_per_node(_args(num_gpus=8), 2)


def _failure(exitcode, local_rank=0):
    return SimpleNamespace(exitcode=exitcode, local_rank=local_rank, pid=100 + local_rank)


def test_failure_line_leaves_out_ranks_the_launcher_stopped():
    failures = {0: _failure(-signal.SIGTERM), 1: _failure(3, 1), 2: _failure(-signal.SIGTERM, 2)}
    roots = launch._root_failures(failures)
    assert list(roots) == [1]
    assert launch._failure_line(roots) == ("dsinfer: rank 1 (local rank 1, pid 101) failed with "
                                           "exit code 3; stopped all other ranks")
    both = launch._failure_line({0: _failure(1), 2: _failure(-signal.SIGKILL, 2)})
    assert both.startswith("dsinfer: rank 0 failed with exit code 1, rank 2 was killed by SIGKILL")


@pytest.mark.parametrize("exitcode, want", [(1, 1), (7, 7), (-signal.SIGKILL, 137), (-signal.SIGTERM, 143)])
def test_exit_code_follows_the_failed_rank(exitcode, want):
    assert launch._exit_code(exitcode) == want
