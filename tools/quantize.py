"""dsinfer-quantize: MoQ-style grouped int8 weights, pre-sharded, with an error report."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dsinfer.formats import READERS, CheckpointError
from dsinfer.quantize import PER_CHANNEL, SCALE_DTYPES, QuantConfig, quantize
from dsinfer.reshard import DTYPES

from ._cli import Formatter, human_bytes, run

EXAMPLES = """examples:
  dsinfer-quantize ./llama-hf --out ./llama-int8 --groups per-channel
  dsinfer-quantize ./megatron_tp8 --out ./int8-tp2 --tp 2 --groups 64 --mlp-extra-grouping
  dsinfer-quantize ./llama-hf --out ./int8 --groups 64 --group-size 128 --report err.json
  dsinfer-reshard ./int8-tp2 --tp 4 --out ./int8-tp4      # int8 shards re-shard exactly
"""


def _groups(value: str):
    if value == PER_CHANNEL:
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or '{PER_CHANNEL}'")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsinfer-quantize", formatter_class=Formatter, epilog=EXAMPLES,
        description="Quantize the linear weights of a checkpoint to symmetric int8 with "
                    "per-group scales (DeepSpeed MoQ's scheme) and write it pre-sharded. Groups "
                    "are contiguous blocks of output rows of the full weight, so the result is "
                    "identical at every TP degree and can be re-sharded without re-quantizing.")
    p.add_argument("src", help="anything dsinfer-reshard reads (HF, Megatron, DeepSpeed, dsinfer)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--groups", type=_groups, required=True,
                   help=f"groups of output rows per weight, or '{PER_CHANNEL}' (one per row); "
                        "a count that does not divide the rows becomes the next one that does")
    p.add_argument("--mlp-extra-grouping", action="store_true",
                   help="twice the groups for MLP weights")
    p.add_argument("--group-size", type=int, default=None,
                   help="also cut each row into blocks of this many input columns")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the tensors left in float (default: the source's)")
    p.add_argument("--scale-dtype", choices=sorted(SCALE_DTYPES), default="float32")
    p.add_argument("--quantize-embeddings", action="store_true",
                   help="also quantize the embeddings and the LM head")
    p.add_argument("--skip", action="append", default=[], metavar="REGEX",
                   help="keep tensors whose name matches in float (repeatable)")
    p.add_argument("--report", default=None, metavar="FILE.json",
                   help="write the per-tensor error report here")
    p.add_argument("--from", dest="fmt", choices=list(READERS), default=None)
    p.add_argument("--arch", default=None, help="architecture when the source does not say")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="Megatron: strip vocab padding rows down to this many")
    p.add_argument("--force", action="store_true", help="replace an existing --out / --report")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def _print_summary(res, summary: dict) -> None:
    print(f"wrote {res.out} (int8, {res.architecture}, tp={res.tp}): {len(res.files)} files, "
          f"{human_bytes(res.bytes)} in {res.seconds:.1f} s")
    print(f"quantized {summary['tensors']} tensors: relative error mean "
          f"{summary['mean_rel_error']:.4%} worst {summary['max_rel_error']:.4%}; SQNR mean "
          f"{summary['mean_sqnr_db']:.1f} dB worst {summary['min_sqnr_db']:.1f} dB")
    for w in summary["worst"]:
        print(f"  {w['rel_error']:.4%}  {w['sqnr_db']:6.1f} dB  {w['name']}")


def _check_report_path(path: Path, force: bool) -> None:
    """Before any work: --report names a file that can be written (its folder exists and is
    writable) and does not exist yet, unless --force."""
    folder = path.parent
    if path.is_dir():
        raise CheckpointError(f"--report {path}: is a folder; name a file such as "
                              f"{path / 'report.json'}")
    if path.exists() and not force:
        raise CheckpointError(f"{path}: already exists; pass --force to replace it, or "
                              "choose another --report")
    if not folder.is_dir():
        raise CheckpointError(f"--report {path}: folder {folder} does not exist; create it or "
                              "choose another --report")
    if not os.access(folder, os.W_OK):
        raise CheckpointError(f"--report {path}: folder {folder} is not writable; choose "
                              "another --report")


def _body(args) -> int:
    qc = QuantConfig(groups=args.groups, mlp_extra_grouping=args.mlp_extra_grouping,
                     group_size=args.group_size, scale_dtype=args.scale_dtype,
                     quantize_embeddings=args.quantize_embeddings, skip=tuple(args.skip))
    if args.report:
        _check_report_path(Path(args.report), args.force)
    res, report = quantize(args.src, args.out, qc, tp=args.tp, dtype=args.dtype, fmt=args.fmt,
                           arch=args.arch, vocab_size=args.vocab_size, force=args.force,
                           progress=not args.quiet)
    if args.report:
        tmp = Path(args.report).with_name(Path(args.report).name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(args.report)
    if not args.quiet:
        _print_summary(res, report["summary"])
    return 0


def main(argv=None) -> int:
    return run("dsinfer-quantize", _body, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
