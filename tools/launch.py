"""dsinfer: run a script on N processes, one per GPU (or N CPU processes), DeepSpeed-launcher style.

A drop-in for `deepspeed --num_gpus N script.py`, built on torchrun (`torch.distributed.run`):
every process gets LOCAL_RANK, RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in its environment
and, like DeepSpeed's launcher, `--local_rank=<i>` before its own arguments (`--no_local_rank`
drops it). A failing rank stops the others; the launcher then prints one line naming it and exits
with its exit code.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import logging
import os
import shutil
import signal
import sys
import uuid
from typing import Optional, Sequence

# Not importing ._cli: it pulls in torch (2-3 s), which --help and command-line errors never need.
PROG = "dsinfer"
EXIT_ERROR = 1       # as _cli: a failed launch
EXIT_USAGE = 2       # bad command line, as argparse does

EXAMPLES = """examples:
  dsinfer --num_gpus 2 generate.py --prompt "DeepSpeed is"    # 2 ranks, one per GPU
  dsinfer generate.py                                         # all GPUs here (1 CPU process if none)
  dsinfer --num_procs 4 test_tp.py                            # 4 processes, GPUs or not (gloo on CPU)
  python -m dsinfer --num_gpus 8 -m mypkg.serve --port 8000   # run a module, like python -m
  dsinfer --tee 3 --local_ranks_filter 0 generate.py          # prefixed lines, rank 0 only on screen
  # two nodes, 8 GPUs each: run on every node, changing only --node_rank
  dsinfer --nnodes 2 --node_rank 0 --master_addr 10.0.0.1 --master_port 29500 --num_gpus 8 run.py

environment of every process: LOCAL_RANK, RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT (a free port unless --master_port or a multi-node job). LOGLEVEL=INFO shows torchrun's
own logs, hidden by default.
"""

# torchrun options forwarded under torchrun's own name: (flags, argparse kwargs). Defaults stay
# torchrun's, so only what the user typed is forwarded.
TORCHRUN_OPTIONS = [
    (("--nnodes",), dict(metavar="N|MIN:MAX", help="number of nodes (default 1)")),
    (("--node_rank", "--node-rank"), dict(type=int, metavar="R", help="rank of this node (default 0)")),
    (("--master_addr", "--master-addr"), dict(metavar="A", help="address of node 0 (multi-node)")),
    (("--master_port", "--master-port"), dict(type=int, metavar="P",
                                              help="port on node 0 (default: a free port on one "
                                                   "node, 29500 on several)")),
    (("--rdzv_backend", "--rdzv-backend"), dict(metavar="B", help="rendezvous backend, e.g. c10d")),
    (("--rdzv_endpoint", "--rdzv-endpoint"), dict(metavar="HOST:PORT", help="rendezvous endpoint")),
    (("--rdzv_id", "--rdzv-id"), dict(metavar="ID", help="job id shared by all nodes")),
    (("--rdzv_conf", "--rdzv-conf"), dict(metavar="K=V,...", help="rendezvous settings, e.g. timeout=60")),
    (("--local_addr", "--local-addr"), dict(metavar="A", help="address of this node")),
    (("--max_restarts", "--max-restarts"), dict(type=int, metavar="K", help="restarts before failing (default 0)")),
    (("--monitor_interval", "--monitor-interval"), dict(type=float, metavar="S", help="seconds between health checks")),
    (("--log_dir", "--log-dir"), dict(metavar="DIR", help="folder for --redirects/--tee logs")),
    (("-r", "--redirects"), dict(metavar="STD", help="send streams to files in --log_dir (3 = both, all ranks)")),
    (("-t", "--tee"), dict(metavar="STD", help="like --redirects, also to the console with [rank] prefixes")),
    (("--local_ranks_filter", "--local-ranks-filter"), dict(metavar="I,J", help="with --tee: local ranks shown on the console")),
]

# DeepSpeed launcher options with no meaning here: flag -> what to do instead.
DEEPSPEED_ONLY = {
    "--hostfile": "run dsinfer on every node with --nnodes/--node_rank/--master_addr instead of a hostfile",
    "--num_nodes": "run dsinfer on every node with --nnodes/--node_rank/--master_addr",
    "--include": "choose GPUs with CUDA_VISIBLE_DEVICES=1,3 dsinfer --num_gpus 2 ...",
    "--exclude": "choose GPUs with CUDA_VISIBLE_DEVICES=1,3 dsinfer --num_gpus 2 ...",
}


class UsageError(Exception):
    """A bad command line: one line on stderr, exit 2."""


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        # defaults are torchrun's and stated in the help texts, so no "(default: None)" lines
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Run a Python script (or module) on N processes for tensor-parallel inference,\n"
                    "like `deepspeed --num_gpus N`: one process per GPU (NCCL), or N CPU processes\n"
                    "(gloo) on a machine without GPUs. Built on torchrun (torch.distributed.run).")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--num_gpus", "--num-gpus", type=_positive, metavar="N",
                   help="processes per node, one per GPU (default: all GPUs, or 1 CPU process); "
                        "more than the GPUs here is an error")
    n.add_argument("--num_procs", "--num-procs", type=_positive, metavar="N",
                   help="processes per node, whatever the GPUs")
    p.add_argument("-m", "--module", action="store_true", help="SCRIPT is a module name, as in python -m")
    p.add_argument("--no_python", "--no-python", action="store_true",
                   help="SCRIPT is an executable, run without python")
    p.add_argument("--no_local_rank", "--no-local-rank", action="store_true",
                   help="do not pass --local_rank=<i> to the script (read LOCAL_RANK instead)")
    t = p.add_argument_group("torchrun options (passed through)")
    for flags, kwargs in TORCHRUN_OPTIONS:
        t.add_argument(*flags, default=None, **kwargs)
    for flag in DEEPSPEED_ONLY:
        p.add_argument(flag, dest=f"ds_{flag[2:]}", default=None, help=argparse.SUPPRESS)
    p.add_argument("script", metavar="SCRIPT", help="Python script to run on every rank")
    p.add_argument("script_args", nargs=argparse.REMAINDER, metavar="...", help="its arguments")
    return p


# ---- checks: everything the user can get wrong fails here, before any process starts ----

def _check_options(args) -> None:
    for flag, instead in DEEPSPEED_ONLY.items():
        if getattr(args, f"ds_{flag[2:]}") is not None:
            raise UsageError(f"{flag} is a DeepSpeed (pdsh) launcher option; {instead}")
    if args.module and args.no_python:
        raise UsageError("-m/--module and --no_python cannot be used together")
    if _max_nodes(args.nnodes) > 1 and not (args.master_addr or args.rdzv_endpoint):
        raise UsageError(f"--nnodes {args.nnodes} needs --master_addr (node 0's address, the same "
                         "on every node) or --rdzv_endpoint")


def _check_target(args) -> None:
    if args.module:
        # Only the top-level package: finding `a.b` would import `a` here. The children run with
        # the working directory on sys.path (python -m), so look there first.
        top = args.script.split(".")[0]
        if importlib.machinery.PathFinder.find_spec(top, [os.getcwd(), *sys.path]) is None \
                and top not in sys.builtin_module_names:
            raise UsageError(f"module not found: {args.script} (no {top!r} in the working "
                             "directory or on sys.path)")
    elif args.no_python:
        if shutil.which(args.script) is None:
            raise UsageError(f"executable not found: {args.script}")
    elif not os.path.isfile(args.script):
        raise UsageError(f"script not found: {args.script}")


def _max_nodes(nnodes: Optional[str]) -> int:
    if not nnodes:
        return 1
    try:
        return int(nnodes.split(":")[-1])
    except ValueError:
        raise UsageError(f"--nnodes must be N or MIN:MAX, got {nnodes!r}") from None


def _procs_per_node(args, gpus: int) -> int:
    """Processes on this node; prints a notice when GPUs were asked for but none exist."""
    if args.num_procs:
        return args.num_procs
    if args.num_gpus is None:
        return max(gpus, 1)
    if gpus == 0:
        print(f"{PROG}: no GPU on this machine; running {args.num_gpus} CPU processes (gloo)",
              file=sys.stderr)
        return args.num_gpus
    if args.num_gpus > gpus:
        raise UsageError(f"--num_gpus {args.num_gpus} but this machine has {gpus} GPU(s) "
                         f"visible; use --num_gpus {gpus} or fewer, or --num_procs")
    return args.num_gpus


def _gpu_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ---- the launch ----

def _dest(flags) -> str:
    return next(f for f in flags if f.startswith("--"))[2:].replace("-", "_")


def _torchrun_args(args, nproc: int) -> argparse.Namespace:
    """torchrun's own parsed arguments, holding what the user typed and torchrun's defaults."""
    from torch.distributed import run as torchrun
    argv = [f"--nproc_per_node={nproc}"]
    for flags, _ in TORCHRUN_OPTIONS:
        dest = _dest(flags)
        if getattr(args, dest) is not None:
            argv.append(f"--{dest}={getattr(args, dest)}")  # torchrun takes every underscore form
    targs = torchrun.parse_args([*argv, args.script])
    chose_endpoint = any(v is not None for v in (args.master_addr, args.master_port,
                                                 args.rdzv_endpoint, args.rdzv_backend))
    if _max_nodes(args.nnodes) == 1 and not chose_endpoint:
        # One node, no port given: a c10d store on port 0 (the OS picks a free one), so two jobs
        # on one machine never collide on 29500. torchrun's --standalone, which run() applies.
        targs.rdzv_backend, targs.rdzv_endpoint, targs.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    elif targs.master_port is None:
        targs.master_port = 29500  # several nodes must agree on it: the default of torchrun and deepspeed
    return targs


def _command(args) -> tuple:
    """(executable, its arguments) as DeepSpeed's launcher builds them."""
    from torch.distributed.elastic.utils import macros
    # -u as torchrun and deepspeed do: a rank's output is on screen before a failure stops it.
    if args.no_python:
        exe, argv = args.script, []
    else:
        exe = os.getenv("PYTHON_EXEC", sys.executable)
        argv = ["-u", *(["-m"] if args.module else []), args.script]
    if not args.no_local_rank:
        argv.append(f"--local_rank={macros.local_rank}")
    return exe, [*argv, *args.script_args]


def _set_threads(nproc: int) -> None:
    # torchrun would set 1 thread per process (with a banner); a CPU run wants the cores shared.
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        os.environ["OMP_NUM_THREADS"] = str(max(1, (cores or 1) // nproc))


def _quiet_torchrun() -> None:
    # torchrun logs each stop and failure at WARNING/ERROR, then a multi-screen summary; the one
    # line from _failure_line replaces them. Only this process is silenced (the user's code runs
    # in the children); LOGLEVEL=INFO, torchrun's own knob, brings the logs back.
    if "LOGLEVEL" not in os.environ:
        logging.disable(logging.ERROR)


def _root_failures(failures: dict) -> dict:
    """The ranks that failed on their own: torchrun records the ranks it stopped with SIGTERM too."""
    roots = {r: f for r, f in failures.items() if f.exitcode != -signal.SIGTERM}
    return roots or failures


def _failure_line(roots: dict) -> str:
    """One line naming the failed rank(s); their own tracebacks are already on stderr above."""
    ranks = sorted(roots)
    hows = [_how(roots[r].exitcode) for r in ranks]
    if len(ranks) == 1:
        f = roots[ranks[0]]
        return (f"{PROG}: rank {ranks[0]} (local rank {f.local_rank}, pid {f.pid}) {hows[0]}; "
                "stopped all other ranks")
    # Ranks that fail within one health check (0.1 s) come with no order between them: a rank that
    # dies breaks its peers' collectives at once. The first error printed above is usually the cause.
    if len(set(hows)) == 1:
        what = f"ranks {', '.join(map(str, ranks))} {hows[0]}"
    else:
        what = ", ".join(f"rank {r} {h}" for r, h in zip(ranks, hows))
    return f"{PROG}: {what}; stopped all other ranks (the first error above is usually the cause)"


def _how(exitcode: int) -> str:
    if exitcode >= 0:
        return f"failed with exit code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    return f"was killed by {name}" + (" (out of memory?)" if exitcode == -signal.SIGKILL else "")


def _exit_code(exitcode: int) -> int:
    # a rank killed by signal S exits the launcher with 128 + S, as a shell reports it
    return 128 - exitcode if exitcode < 0 else exitcode or EXIT_ERROR


def _launch(args, nproc: int) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import elastic_launch

    _set_threads(nproc)
    _quiet_torchrun()
    config, _, _ = torchrun.config_from_args(_torchrun_args(args, nproc))
    exe, argv = _command(args)
    try:
        elastic_launch(config, exe)(*argv)
    except ChildFailedError as e:
        roots = _root_failures(e.failures)
        print(_failure_line(roots), file=sys.stderr)
        return _exit_code(roots[min(roots)].exitcode)
    except SignalException as e:
        print(f"{PROG}: got {e.sigval.name}; stopped all ranks", file=sys.stderr)
        return 128 + int(e.sigval)
    except RendezvousError as e:
        print(f"{PROG}: error: rendezvous failed: {e}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_options(args)
        _check_target(args)
        nproc = _procs_per_node(args, _gpu_count())
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _launch(args, nproc)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; stopped all ranks", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
