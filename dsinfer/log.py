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


_FAILED = []   # set by the hook below: the process is ending on an uncaught exception


def failed() -> bool:
    """True once an uncaught exception is ending this process (atexit handlers ask)."""
    return bool(_FAILED)


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
        _FAILED.append(kind)
        if isinstance(exc, CheckpointError):
            sys.stderr.write(f"dsinfer: error: {exc}\n")
        elif _peer_failure(exc):
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            sys.stderr.write("dsinfer: error: a collective with the other ranks failed (another "
                             "rank stopped, or none answered within DSINFER_TIMEOUT="
                             f"{os.environ.get('DSINFER_TIMEOUT', '300')} s): {first}\n")
        else:
            previous(kind, exc, tb)
    hook.dsinfer = True
    sys.excepthook = hook


# What torch.distributed raises when a peer is gone or silent (gloo and NCCL wordings).
_PEER_TYPES = ("DistBackendError", "DistNetworkError", "DistStoreError")
_PEER_WORDS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
               "Timed out waiting", "timed out", "Watchdog caught collective operation timeout")


def _peer_failure(exc: BaseException) -> bool:
    if type(exc).__name__ in _PEER_TYPES:
        return True
    return isinstance(exc, RuntimeError) and any(w in str(exc) for w in _PEER_WORDS)
