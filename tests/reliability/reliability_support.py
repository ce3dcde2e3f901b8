"""Helpers of the reliability tests: running the CLIs as a user does, hashing trees, planting
hostile pickles, scrubbing temporary paths out of messages."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from helpers import child_env

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TMP_TAGS = (".dsinfer-tmp-", ".dsinfer-old-")


@dataclasses.dataclass
class Outcome:
    code: Optional[int]     # exit code; None for a library call that raised
    out: str
    err: str

    @property
    def lines(self):
        return [ln for ln in self.err.strip().splitlines() if ln.strip()]

    @property
    def message(self) -> str:
        return self.lines[-1] if self.lines else ""


def cli(tool: str, *argv) -> Outcome:
    """Runs dsinfer-<tool> in this process (as its console script does) and captures it."""
    import importlib
    module = importlib.import_module(f"dsinfer.tools.{tool}")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = module.main([str(a) for a in argv])
        except SystemExit as e:  # argparse errors
            code = e.code
    return Outcome(code, out.getvalue(), err.getvalue())


def console(tool: str, *argv, timeout: float = 120, **kwargs) -> Outcome:
    """Runs the installed console script dsinfer-<tool> in a child process."""
    r = subprocess.run([str(BIN / f"dsinfer-{tool}"), *map(str, argv)], capture_output=True,
                       text=True, timeout=timeout, **kwargs)
    return Outcome(r.returncode, r.stdout, r.stderr)


def assert_one_line(o: Outcome, *needles, code: int = 1, prog: str = "dsinfer-"):
    """A user error: exit `code`, exactly one line on stderr, no traceback, needles in it."""
    assert o.code == code, (o.code, o.err[-2000:])
    assert "Traceback" not in o.err, o.err
    assert len(o.lines) == 1, o.err
    assert o.lines[0].startswith(prog), o.lines[0]
    for n in needles:
        assert n in o.lines[0], (n, o.lines[0])


def tree_hash(path: Path) -> dict:
    """relpath -> sha256 of every file under `path` (or of `path` itself)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)) if p != path else p.name:
            hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def leftovers(parent: Path) -> list:
    return sorted(p.name for p in Path(parent).iterdir() if any(t in p.name for t in TMP_TAGS))


def scrub(text: str, *roots) -> str:
    """Replaces temporary roots by <tmp> and the repository by <repo>: stable table rows."""
    for r in roots:
        text = text.replace(str(r), "<tmp>")
    return text.replace(str(REPO), "<repo>")


def copy(src: Path, dst: Path) -> Path:
    import shutil
    return Path(shutil.copytree(src, dst) if Path(src).is_dir() else shutil.copy(src, dst))


# ---- hostile pickles -------------------------------------------------------------------------

class RunsCode:
    """Unpickling this calls `func(*args)`: the classic pickle exploit."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def payloads(marker: Path) -> dict:
    """Ways a pickle can run code, each creating `marker` if it ever runs."""
    import builtins
    import subprocess as sp
    return {
        "os.system": RunsCode(os.system, f"touch {marker}"),
        "builtins.exec": RunsCode(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": RunsCode(sp.call, ["touch", str(marker)]),
    }


def _save(obj, path: Path) -> None:
    """torch.save next to `path`, then rename over it: the old file may be memory-mapped."""
    import torch
    torch.save(obj, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


def plant_hf_bin(folder: Path, payload) -> Path:
    """pytorch_model.bin whose state dict carries the payload beside the weights."""
    import torch
    path = folder / "pytorch_model.bin"
    sd = torch.load(path, weights_only=True)
    sd["transformer.h.0.attn.masked_bias"] = payload
    _save(sd, path)
    return path


def plant_megatron_args(folder: Path, payload) -> list:
    """Every model_optim_rng.pt gets the payload inside its `args` Namespace."""
    import torch
    from dsinfer.formats.safe_pickle import load_pt
    paths = sorted(folder.rglob("model_optim_rng.pt"))
    for path in paths:
        state = load_pt(path)
        state["args"].data_path = payload
        _save(state, path)
    return paths


def plant_deepspeed_states(folder: Path, payload) -> Path:
    """mp_rank_00_model_states.pt rewritten as DeepSpeed lays it out, plus the payload. (The
    fixture's own DeepSpeed objects are inert stand-ins that cannot be pickled again, so the
    plain-data entries are kept and the payload rides in `lr_scheduler`.)"""
    import torch
    from dsinfer.formats.safe_pickle import InertObject, load_pt
    path = next(folder.rglob("mp_rank_00_model_states.pt"))
    state = load_pt(path)
    plain = {k: v for k, v in state.items() if not _has_inert(v, InertObject)}
    plain["lr_scheduler"] = payload
    _save(plain, path)
    return path


def _has_inert(v, cls) -> bool:
    if isinstance(v, cls):
        return True
    if isinstance(v, dict):
        return any(_has_inert(x, cls) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_has_inert(x, cls) for x in v)
    return False


# ---- a run with a failing rank under the launcher (fault_worker.py) --------------------------

HERE = Path(__file__).resolve().parent
MISSING = "rank-01-of-02/part-000.safetensors: rank file missing"


def launch_faulty(mode: str, ckpt: Path, logdir: Path, timeout_env: int, limit: float):
    """`python -m dsinfer --num_procs 2 fault_worker.py MODE CKPT LOGDIR`: (result, seconds)."""
    import time
    env = child_env(HERE, HERE.parent / "support", DSINFER_TIMEOUT=str(timeout_env),
                    OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "dsinfer", "--num_procs", "2",
                        str(HERE / "fault_worker.py"), mode, str(ckpt), str(logdir)],
                       capture_output=True, text=True, timeout=limit, env=env)
    return r, time.monotonic() - t0


def rank_raise_result(sources: dict, root: Path, memo: dict):
    """Rank 1's file missing, 2 ranks: run once per session (a test and the table use it)."""
    if "rank_raise" not in memo:
        folder = root / "c" / "rank_raise"
        folder.mkdir(parents=True)
        ckpt = copy(sources["llama_tp2"], folder / "ckpt")
        (ckpt / "rank-01-of-02" / "part-000.safetensors").unlink()
        (folder / "log").mkdir()
        r, seconds = launch_faulty("raise", ckpt, folder / "log", timeout_env=300, limit=120)
        memo["rank_raise"] = (r, seconds, folder / "log")
    return memo["rank_raise"]
