"""dsinfer-reshard: merge or split a checkpoint to any tensor-parallel degree."""
from __future__ import annotations

import argparse
import sys

from dsinfer import specs
from dsinfer.formats import READERS
from dsinfer.reshard import DTYPE_NAMES, TARGETS, reshard

from ._cli import Formatter, human_bytes, run

EXAMPLES = """examples:
  dsinfer-reshard ./llama-hf --tp 4 --out ./llama-tp4                  # HF -> 4 pre-sharded ranks
  dsinfer-reshard ./megatron_ckpt --tp 2 --out ./gpt-tp2 --vocab-size 50257
  dsinfer-reshard ./ds_run/checkpoints --tp 1 --to hf --out ./hf --dtype float16
  dsinfer-reshard ./llama-tp4 --tp 2 --out ./llama-tp2                 # re-shard dsinfer output
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsinfer-reshard", formatter_class=Formatter, epilog=EXAMPLES,
        description="Read a Megatron-LM, DeepSpeed, HF or dsinfer checkpoint and write it "
                    "pre-sharded for N tensor-parallel ranks (or as one HF folder), streaming "
                    "one tensor at a time. The output appears atomically.")
    p.add_argument("src", help="checkpoint folder, dsinfer.json, or tutorial checkpoint.json")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel degree to write")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--to", choices=TARGETS, default="dsinfer", help="output format")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                   help="cast floating-point tensors (default: keep the source dtype)")
    p.add_argument("--from", dest="fmt", choices=list(READERS), default=None,
                   help="source format (default: detected from the path)")
    p.add_argument("--arch", default=None,
                   help=f"architecture when the source does not say (one of: {', '.join(specs.known())}; "
                        "for Megatron also gpt2 or llama)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="Megatron: strip vocab padding rows down to this many")
    p.add_argument("--force", action="store_true", help="replace an existing --out (atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def _body(args) -> int:
    res = reshard(args.src, args.out, args.tp, to=args.to, dtype=args.dtype, fmt=args.fmt,
                  arch=args.arch, vocab_size=args.vocab_size, force=args.force,
                  progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {res.out} ({res.to}, {res.architecture}, tp={res.tp}): {len(res.files)} "
              f"files, {human_bytes(res.bytes)} in {res.seconds:.1f} s")
    return 0


def main(argv=None) -> int:
    return run("dsinfer-reshard", _body, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
