"""Logging for the runtime: warnings print once per job (rank 0), not once per rank; a user
error that ends a rank prints one line, not a traceback."""
import logging
import os
import sys

logger = logging.getLogger("dsinfer")


def warn(msg: str, *args) -> None:
    if os.environ.get("RANK", "0") == "0":
        logger.warning(msg, *args)


def info(msg: str, *args) -> None:
    if os.environ.get("RANK", "0") == "0":
        logger.info(msg, *args)


def one_line_errors() -> None:
    """An uncaught CheckpointError (a bad checkpoint or option: the user's to fix) ends the
    process with its one-line message, as the CLIs do, instead of a traceback; every other
    exception keeps the previous hook. Installed by init_inference before the process group
    exists, so torch's hook then adds the [rankN] prefix."""
    from dsinfer.formats import CheckpointError
    previous = sys.excepthook
    if getattr(previous, "dsinfer", False):
        return

    def hook(kind, exc, tb):
        if isinstance(exc, CheckpointError):
            sys.stderr.write(f"dsinfer: error: {exc}\n")
        else:
            previous(kind, exc, tb)
    hook.dsinfer = True
    sys.excepthook = hook
