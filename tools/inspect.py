"""dsinfer-inspect: summarise a checkpoint; with --verify, check every hash and shape."""
from __future__ import annotations

import argparse
import json
import sys

from dsinfer.inspect import summary, verify

from ._cli import EXIT_ERROR, Formatter, human_bytes, run

EXAMPLES = """examples:
  dsinfer-inspect ./llama-tp4             # architecture, TP, dtype, sizes per rank
  dsinfer-inspect ./llama-tp4 --verify    # also check sha256, sizes and tensor shapes (exit 1 on any mismatch)
  dsinfer-inspect ./llama-tp4 --json
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsinfer-inspect", formatter_class=Formatter,
                                epilog=EXAMPLES, description=__doc__.split(": ", 1)[1])
    p.add_argument("path", help="dsinfer folder (or any checkpoint dsinfer reads)")
    p.add_argument("--verify", action="store_true",
                   help="check every file's size and sha256 and every tensor's shape")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="print only problems")
    return p


def _print_summary(s: dict) -> None:
    for key in ("format", "architecture", "tp_size", "dtype", "quantization", "source",
                "tensors", "split_tensors"):
        if key in s:
            print(f"{key:>14}: {s[key] if s[key] is not None else 'none'}")
    print(f"{'bytes':>14}: {human_bytes(s['bytes'])}")
    for rank, n in s.get("bytes_per_rank", {}).items():
        print(f"{rank:>14}: {human_bytes(n)}")


def _body(args) -> int:
    s = summary(args.path)
    if not args.quiet:
        print(json.dumps(s, indent=1)) if args.json else _print_summary(s)
    if not args.verify:
        return 0
    problems = verify(args.path)
    for p in problems:
        print(f"dsinfer-inspect: {p}", file=sys.stderr)
    if problems:
        print(f"verify: FAILED ({len(problems)} problem{'s' * (len(problems) > 1)})",
              file=sys.stderr)
        return EXIT_ERROR
    if not args.quiet:
        print("verify: OK (every size, sha256 and tensor shape matches the manifest)")
    return 0


def main(argv=None) -> int:
    return run("dsinfer-inspect", _body, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
