"""Summaries and integrity checks of checkpoints (library side of dsinfer-inspect)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import List

from dsinfer.formats import dsinfer_format, open_checkpoint


def summary(path) -> dict:
    """Manifest summary of a dsinfer folder; for any other format, what the reader sees."""
    path = Path(path)
    if not dsinfer_format.sniff(path):
        ckpt = open_checkpoint(path)
        return {"format": ckpt.format, "architecture": ckpt.config.get("architectures"),
                "tensors": len(ckpt.tensors), "bytes": sum(t.nbytes for t in ckpt.tensors),
                "source": ckpt.source}
    root, m = dsinfer_format.load_manifest(path)
    per_rank = defaultdict(int)
    for rel, info in m["files"].items():
        per_rank[rel.split("/")[0] if "/" in rel else "shared"] += info["bytes"]
    split = sum(1 for t in m["tensors"].values() if t.get("split_dim") is not None)
    return {"format": "dsinfer", "format_version": m["format_version"],
            "architecture": m["architecture"], "tp_size": m["tp_size"], "dtype": m["dtype"],
            "quantization": m.get("quantization"), "source": m.get("source"),
            "tensors": len(m["tensors"]), "split_tensors": split,
            "bytes": sum(f["bytes"] for f in m["files"].values()),
            "bytes_per_rank": dict(sorted(per_rank.items()))}


def verify(path, hashes: bool = True) -> List[str]:
    """Every problem found in a dsinfer folder (hash, size, missing file, header shape)."""
    return dsinfer_format.verify(Path(path), hashes=hashes)
