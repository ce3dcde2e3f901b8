"""Tensor-parallel modules and the transform that installs them into a built model.

Every rank holds its slice of each split weight (see dsinfer.specs for the plan):

    colwise   y_r = x W_r^T + b_r         output features of this rank only (local heads)
    rowwise   y = all_reduce(x_r W_r^T) + b   input features of this rank, summed over ranks
    gather    like colwise, then all-gather along the last dim (vocab-parallel LM head)
    vocab     embedding rows [start, start + n): masked lookup, then all-reduce
    local     embedding split on its feature dim (T5 relative bias [buckets, heads])

Weights may be int8 with per-group scales; they are dequantized at forward (the torch
reference; the kernels issue replaces this with a fused GEMM).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dsinfer.kernels import decode_linear, dequantize_ref


@dataclasses.dataclass
class TPGroup:
    rank: int = 0
    size: int = 1
    group: Optional[object] = None   # torch.distributed process group (None = default)
    fast: Optional[Callable] = None  # fast_allreduce.NVLinkAllReduce for small sums (GPU)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks: in place through NCCL/gloo, or a new tensor from the NVLink
        one-shot kernel for small ones. Callers use the returned tensor."""
        if self.size == 1:
            return x
        if self.fast is not None and self.fast.fits(x):
            return self.fast(x)
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)


class ParallelLinear(torch.nn.Module):
    """Linear ([out, in]) or Conv1D ([in, out], `transposed`) holding this rank's slice."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], mode: str,
                 tp: TPGroup, transposed: bool = False, scale: Optional[torch.Tensor] = None):
        super().__init__()
        assert mode in ("colwise", "rowwise", "gather", "replicate"), mode
        self.mode, self.tp, self.transposed = mode, tp, transposed
        if scale is None:
            self.weight = torch.nn.Parameter(weight, requires_grad=False)
            self.weight_scale = None
        else:  # int8 weight + scales [groups, col_groups] of its [out, in] view
            self.register_buffer("weight", weight)
            self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def _weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.weight_scale is None:
            return self.weight
        w = self.weight.t() if self.transposed else self.weight
        w = dequantize_ref(w, self.weight_scale, dtype)
        return w.t() if self.transposed else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._weight(x.dtype)
        # decode_linear: the Triton GEMV for the few rows of a decode step on a GPU (LM heads,
        # layers outside fused blocks), else F.linear
        y = x @ w if self.transposed else decode_linear(x, w)
        if self.mode == "rowwise":
            y = self.tp.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        if self.mode == "gather":
            y = self.tp.all_gather_last(y)
        return y

    def extra_repr(self) -> str:
        kind = "int8" if self.weight_scale is not None else str(self.weight.dtype)
        return f"mode={self.mode}, local_weight={tuple(self.weight.shape)}, {kind}, tp={self.tp.size}"


class ParallelEmbedding(torch.nn.Module):
    """mode "vocab": rows [start, start + n) of the table; "local": a slice of the features."""

    def __init__(self, weight: torch.Tensor, mode: str, tp: TPGroup, start: int = 0,
                 padding_idx: Optional[int] = None, scale: Optional[torch.Tensor] = None):
        super().__init__()
        self.mode, self.tp, self.start, self.padding_idx = mode, tp, start, padding_idx
        if scale is None:
            self.weight = torch.nn.Parameter(weight, requires_grad=False)
            self.weight_scale = None
        else:
            self.register_buffer("weight", weight)
            self.register_buffer("weight_scale", scale)

    def _table(self) -> torch.Tensor:
        if self.weight_scale is None:
            return self.weight
        return dequantize_ref(self.weight, self.weight_scale, self.weight_scale.dtype
                              if self.weight_scale.dtype.is_floating_point else torch.float32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = self._table()
        if self.mode == "local" or self.tp.size == 1:
            return F.embedding(ids, table)
        n = table.shape[0]
        mine = (ids >= self.start) & (ids < self.start + n)
        local = torch.where(mine, ids - self.start, torch.zeros_like(ids))
        out = F.embedding(local, table) * mine.unsqueeze(-1).to(table.dtype)
        return self.tp.all_reduce(out)


# ----------------------------------------------------------------------------- head counts

def localize_heads(model: torch.nn.Module, spec, tp: TPGroup) -> int:
    """Divides the head-count attributes named by the spec; returns how many were changed."""
    changed = 0
    for path, attrs in spec.local_heads:
        pattern = re.compile(path)
        for name, module in model.named_modules():
            if not pattern.search(name):
                continue
            for attr in attrs:
                value = getattr(module, attr, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    if value % tp.size:
                        raise ValueError(f"{name}.{attr} = {value} does not divide by TP {tp.size}")
                    setattr(module, attr, value // tp.size)
                    changed += 1
    return changed


def _alibi_local_heads(module, tp: TPGroup):
    """BLOOM builds ALiBi for all heads at the model level ([batch*heads, 1, keys]); each
    rank's attention needs the rows of its own heads."""
    def hook(mod, args, kwargs):
        alibi = kwargs.get("alibi")
        if alibi is None or tp.size == 1:
            return None
        local = mod.num_heads
        full = local * tp.size
        b = alibi.shape[0] // full
        alibi = alibi.view(b, full, *alibi.shape[1:])[:, tp.rank * local:(tp.rank + 1) * local]
        kwargs["alibi"] = alibi.reshape(b * local, *alibi.shape[2:])
        return args, kwargs
    return hook


HOOKS: Dict[str, Callable] = {"alibi_local_heads": _alibi_local_heads}


def install_hooks(model: torch.nn.Module, spec, tp: TPGroup) -> None:
    for path, hook_name in spec.hooks:
        pattern = re.compile(path)
        for name, module in model.named_modules():
            if pattern.search(name):
                module.register_forward_pre_hook(HOOKS[hook_name](module, tp), with_kwargs=True)
