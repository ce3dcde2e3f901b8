"""MoQ-style grouped int8 quantization of a checkpoint, written in the dsinfer format.

Each selected weight `X.weight` becomes int8 (same name, same storage orientation) plus
`X.weight_scale` [groups, col_groups] (see dsinfer.kernels.quant_ref for the maths). Groups are
counted over the FULL weight, before any TP split, so the result is the same bit for bit at
every TP degree and survives any number of reshards.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from dsinfer import specs
from dsinfer.formats import Checkpoint, CheckpointError, TensorRef
from dsinfer.kernels import dequantize_ref, quantize_ref
from dsinfer.reshard import Result, Target, open_source, write

METHOD = "int8-moq"
PER_CHANNEL = "per-channel"
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
ROLES = ("attn", "mlp")            # linear layers of the blocks
EMBED_ROLES = ("embed", "head")    # only with quantize_embeddings


@dataclasses.dataclass
class QuantConfig:
    groups: Union[int, str] = PER_CHANNEL   # int, or "per-channel" (one group per output row)
    mlp_extra_grouping: bool = False        # twice the groups for MLP weights
    group_size: Optional[int] = None        # also cut rows into blocks of K columns
    scale_dtype: str = "float32"
    quantize_embeddings: bool = False
    skip: Tuple[str, ...] = ()              # regexes of tensor names to keep in float

    def __post_init__(self):
        if self.groups != PER_CHANNEL and (not isinstance(self.groups, int) or self.groups < 1):
            raise CheckpointError(f"--groups must be a positive integer or '{PER_CHANNEL}' "
                                  f"(got {self.groups!r})")
        if self.group_size is not None and self.group_size < 1:
            raise CheckpointError(f"--group-size must be positive (got {self.group_size})")
        if self.scale_dtype not in SCALE_DTYPES:
            raise CheckpointError(f"--scale-dtype must be one of {', '.join(SCALE_DTYPES)}")
        try:
            self._skip = [re.compile(p) for p in self.skip]
        except re.error as e:
            raise CheckpointError(f"--skip: bad regular expression ({e})") from None

    def manifest_block(self, quantized: List[str]) -> dict:
        return {"method": METHOD, "bits": 8, "symmetric": True, "groups": self.groups,
                "mlp_extra_grouping": self.mlp_extra_grouping, "group_size": self.group_size,
                "scale_dtype": self.scale_dtype, "quantize_embeddings": self.quantize_embeddings,
                "quantized": quantized}

    def selects(self, rule: Optional[specs.Rule], t: TensorRef) -> bool:
        roles = ROLES + (EMBED_ROLES if self.quantize_embeddings else ())
        return (rule is not None and rule.role in roles and t.name.endswith(".weight")
                and len(t.shape) == 2 and t.dtype.is_floating_point
                and not any(p.search(t.name) for p in self._skip))

    def groups_for(self, name: str, rule: specs.Rule, rows: int) -> int:
        """Effective group count: the smallest divisor of `rows` >= the asked count."""
        if self.groups == PER_CHANNEL:
            return rows
        asked = self.groups * (2 if self.mlp_extra_grouping and rule.role == "mlp" else 1)
        if asked > rows:
            raise CheckpointError(f"tensor '{name}' has {rows} output rows, fewer than the "
                                  f"{asked} groups asked; use --groups {PER_CHANNEL} or fewer")
        return next(d for d in range(asked, rows + 1) if rows % d == 0)


class ErrorStats:
    """Relative L2 error, SQNR (dB) and max abs error of a dequantized weight, accumulated
    block by block (float64 sums) so no full-size temporaries are needed."""

    def __init__(self):
        self.signal, self.noise, self.max_abs = 0.0, 0.0, 0.0

    def add(self, w: torch.Tensor, w_hat: torch.Tensor) -> None:
        err = w_hat.sub_(w)                                     # reuses w_hat's memory
        self.signal += torch.linalg.vector_norm(w, dtype=torch.float64).item() ** 2
        self.noise += torch.linalg.vector_norm(err, dtype=torch.float64).item() ** 2
        if err.numel():
            self.max_abs = max(self.max_abs, err.abs_().max().item())

    def result(self) -> dict:
        s, n = self.signal, self.noise
        return {"rel_error": math.sqrt(n / s) if s else 0.0,
                "sqnr_db": 10 * math.log10(s / n) if n else float("inf"),
                "max_abs_error": self.max_abs}


def error_stats(w: torch.Tensor, w_hat: torch.Tensor) -> dict:
    stats = ErrorStats()
    stats.add(w.float(), w_hat.float().clone())
    return stats.result()


CHUNK_ELEMS = 8 << 20   # rows quantized together: ~32 MB of fp32 temporaries at a time


class _QuantizedWeight:
    """Lazily quantizes one weight; the int8 tensor and its scales are two TensorRefs that
    share one computation (the writer asks for the weight, then for its scale)."""

    def __init__(self, ref: TensorRef, groups: int, qc: QuantConfig, transposed: bool,
                 report: Dict[str, dict]):
        self.ref, self.groups, self.qc, self.transposed, self.report = ref, groups, qc, transposed, report
        self._scale = None

    def _run(self) -> torch.Tensor:
        w = self.ref.load()
        view = w.t() if self.transposed else w               # [out, in]
        rows, cols = view.shape
        per = rows // self.groups                            # rows per group
        step = max(per, CHUNK_ELEMS // max(cols, 1) // per * per)  # whole groups per block
        scale_dtype = SCALE_DTYPES[self.qc.scale_dtype]
        col_groups = cols // self.qc.group_size if self.qc.group_size else 1
        q = torch.empty((rows, cols), dtype=torch.int8)
        s = torch.empty((self.groups, col_groups), dtype=scale_dtype)
        stats = ErrorStats()
        for r0 in range(0, rows, step):   # groups are independent: block results are exact
            r1 = min(rows, r0 + step)
            qb, sb = quantize_ref(view[r0:r1], (r1 - r0) // per, self.qc.group_size, scale_dtype)
            q[r0:r1], s[r0 // per:r1 // per] = qb, sb
            stats.add(view[r0:r1].float(), dequantize_ref(qb, sb))
        self._scale = s
        self.report[self.ref.name] = {"shape": list(self.ref.shape), "groups": self.groups,
                                      "col_groups": col_groups, **stats.result()}
        return q.t().contiguous() if self.transposed else q

    def int8(self) -> torch.Tensor:
        return self._run()

    def scale(self) -> torch.Tensor:
        if self._scale is None:
            self._run()
        s, self._scale = self._scale, None
        return s


def quantized_view(ckpt: Checkpoint, spec: specs.ArchSpec, qc: QuantConfig,
                   report: Dict[str, dict]) -> Tuple[Checkpoint, Dict[str, dict]]:
    """`ckpt` with selected weights replaced by int8 + `_scale` refs; per-tensor extras."""
    tensors, extra = [], {}
    for t in ckpt.tensors:
        rule = spec.rule_for(t.name)
        if not qc.selects(rule, t):
            tensors.append(t)
            continue
        rows = t.shape[1 if rule.transposed else 0]
        cols = t.shape[0 if rule.transposed else 1]
        groups = qc.groups_for(t.name, rule, rows)
        if qc.group_size and cols % qc.group_size:
            raise CheckpointError(f"tensor '{t.name}': --group-size {qc.group_size} does not "
                                  f"divide its {cols} input columns")
        col_groups = cols // qc.group_size if qc.group_size else 1
        qw = _QuantizedWeight(t, groups, qc, rule.transposed, report)
        tensors.append(TensorRef(t.name, t.shape, torch.int8, load=qw.int8))
        tensors.append(TensorRef(t.name + specs.SCALE_SUFFIX, (groups, col_groups),
                                 SCALE_DTYPES[qc.scale_dtype], load=qw.scale))
        extra[t.name] = {"quant": {"groups": groups, "col_groups": col_groups}}
    return dataclasses.replace(ckpt, tensors=tensors), extra


def quantize(src, out, qc: QuantConfig, tp: int = 1, dtype: Optional[str] = None,
             fmt: Optional[str] = None, arch: Optional[str] = None,
             vocab_size: Optional[int] = None, force: bool = False,
             progress: bool = True) -> Tuple[Result, dict]:
    """Reads `src` (anything dsinfer-reshard reads), writes int8 shards for TP `tp` to `out`.
    Returns the write result and the error report {"config", "tensors", "summary"}."""
    target = Target(Path(out), tp, "dsinfer", dtype, force, progress)
    target.check()
    if arch is not None:
        specs.get(arch)              # unknown --arch: an error even where the config says
    ckpt, spec = open_source(src, fmt, arch, vocab_size)
    if ckpt.manifest and ckpt.manifest.get("quantization"):
        raise CheckpointError(f"{src}: already quantized ({ckpt.manifest['quantization']['method']}); "
                              "use dsinfer-reshard to change its TP degree, or quantize the "
                              "float checkpoint it came from")
    report: Dict[str, dict] = {}
    qckpt, extra = quantized_view(ckpt, spec, qc, report)
    if not extra:
        raise CheckpointError(f"{src}: no weight selected for quantization (check --skip)")
    block = qc.manifest_block(sorted(extra))
    result = write(qckpt, spec, target, Path(src), quantization=block, extra=extra)
    return result, {"config": block, "tensors": report, "summary": summarize(report)}


def summarize(report: Dict[str, dict], worst: int = 5) -> dict:
    if not report:
        return {}
    rel = [r["rel_error"] for r in report.values()]
    sq = [r["sqnr_db"] for r in report.values()]
    ranked = sorted(report, key=lambda n: report[n]["rel_error"], reverse=True)
    return {"tensors": len(report), "mean_rel_error": sum(rel) / len(rel),
            "max_rel_error": max(rel), "mean_sqnr_db": sum(sq) / len(sq), "min_sqnr_db": min(sq),
            "worst": [{"name": n, **{k: report[n][k] for k in ("rel_error", "sqnr_db")}}
                      for n in ranked[:worst]]}


def dequantized_state_dict(path, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """Every tensor of an int8 dsinfer checkpoint, merged to TP 1, int8 weights dequantized
    (`q * s`) into `dtype`: what the int8 model computes with, as a plain state dict."""
    ckpt, spec = open_source(path, "dsinfer")
    refs = ckpt.by_name()
    out = {}
    for t in ckpt.tensors:
        if specs.scale_of(t.name, refs):
            continue
        w = t.load()
        scale = refs.get(t.name + specs.SCALE_SUFFIX)
        if scale is not None and w.dtype == torch.int8:
            rule = spec.rule_for(t.name)
            view = w.t() if rule is not None and rule.transposed else w
            w = dequantize_ref(view, scale.load(), dtype)
            w = w.t().contiguous() if rule is not None and rule.transposed else w
        out[t.name] = w.to(dtype) if w.is_floating_point() else w
    return out
