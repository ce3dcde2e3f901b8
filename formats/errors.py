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


TAG_FILE_BYTES = 4096   # a tag file names a folder or an iteration: a few bytes


def read_tag_file(path, fix: str) -> str:
    """The stripped text of a small tag file (DeepSpeed's `latest`, Megatron's
    latest_checkpointed_iteration.txt), or one CheckpointError line naming the file when it is
    binary, not UTF-8 or too large to be one (`fix` says what to write into it)."""
    from pathlib import Path
    data = Path(path).read_bytes()[:TAG_FILE_BYTES + 1]
    try:
        if len(data) > TAG_FILE_BYTES or b"\0" in data:
            raise ValueError("binary or too long")
        return data.decode("utf-8").strip()
    except ValueError as e:   # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path}: not a tag file ({str(e)[:80]}); {fix}") from None
