"""Errors raised at the boundary: each names the file or tensor and the fix."""


class CheckpointError(Exception):
    """A checkpoint cannot be read or written as asked.

    The message is one line meant for the user: what is wrong, which file or tensor, and
    how to fix it. CLIs print it without a traceback and exit non-zero.
    """


class UnsafePickleError(CheckpointError):
    """A pickled file holds something `torch.load(weights_only=True)` refuses to build."""


def read_json_object(path, what: str, fix: str, missing: str = None) -> dict:
    """The JSON object in `path`, or one CheckpointError line naming the file: invalid JSON
    (also absurd nesting and bad bytes), or JSON that is not an object (`what`), each with `fix`.
    A missing file raises FileNotFoundError unless `missing` says what to tell the user."""
    import json
    from pathlib import Path
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        if missing is None:
            raise
        raise CheckpointError(f"{path}: missing; {missing}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({str(e)[:200]}); {fix}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(value).__name__}, not {what}; {fix}")
    return value

