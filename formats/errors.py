"""Errors raised at the boundary: each names the file or tensor and the fix."""


class CheckpointError(Exception):
    """A checkpoint cannot be read or written as asked.

    The message is one line meant for the user: what is wrong, which file or tensor, and
    how to fix it. CLIs print it without a traceback and exit non-zero.
    """


class UnsafePickleError(CheckpointError):
    """A pickled file holds something `torch.load(weights_only=True)` refuses to build."""
