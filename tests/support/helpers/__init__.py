"""Helpers shared by the tests (importable as `helpers`: tests/support is on sys.path)."""
import os


def child_env(*paths, **extra) -> dict:
    """os.environ for a child process with `paths` put before the PYTHONPATH it already has
    (where dsinfer is installed with `pip --target`, that PYTHONPATH is how it is found)."""
    old = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join([*map(str, paths), *old])}
