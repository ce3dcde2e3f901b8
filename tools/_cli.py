"""Shared CLI plumbing: user errors become one line on stderr and a non-zero exit."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from dsinfer.formats import CheckpointError

EXIT_ERROR = 1       # bad input or failed check
EXIT_INTERRUPT = 130


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def run(prog: str, body: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
        argv: Optional[Sequence[str]] = None) -> int:
    args = parser.parse_args(argv)
    try:
        return body(args)
    except CheckpointError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPT


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"
