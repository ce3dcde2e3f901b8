"""The fused blocks' linear layer: one weight in [out, in] row-major layout (the layout the
int8 GEMV streams fastest), optional int8 group scales, bias, and where the TP sum happens.

    colwise  y = x W_r^T + b_r               this rank's output features (its heads)
    rowwise  y = all_reduce(x_r W_r^T) + b   partial sums over this rank's input features

Built from the loaded model's ParallelLinear / nn.Linear / Conv1D (Conv1D's [in, out] storage is
transposed once here). `fuse` concatenates colwise layers that read the same input (Q, K and V;
gate and up) into one weight, so a block runs one GEMM where HF runs three.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from dsinfer import kernels
from dsinfer.tp import ParallelLinear


class Lin:
    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], rowwise: bool,
                 scale: Optional[torch.Tensor] = None):
        self.weight = weight.contiguous()          # [out, in] fp/int8
        self.scale = scale                         # [G, C] for int8, else None
        self.bias = bias
        self.rowwise = rowwise

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def matmul(self, x: torch.Tensor, bias: bool = False, act: Optional[str] = None
               ) -> torch.Tensor:
        """x [..., in] -> act([..., out]) without the TP sum; with the bias in the GEMM's
        epilogue if `bias` (never for a rowwise layer at TP > 1: its bias follows the sum).
        act (kernels.int8_gemm.EPILOGUES; "silu_gate" halves `out`) runs in the decode GEMV's
        epilogue, or after the GEMM on other paths."""
        b = self.bias if bias else None
        if self.scale is not None:
            return kernels.int8_linear(x, self.weight, self.scale, b, act=act)
        return kernels.decode_linear(x, self.weight, b, act=act)  # Triton GEMV or cuBLAS

    def tensors(self):
        return [t for t in (self.weight, self.scale, self.bias) if t is not None]


def from_module(module: torch.nn.Module) -> Lin:
    """ParallelLinear (any mode but gather), nn.Linear or HF Conv1D -> Lin."""
    if isinstance(module, ParallelLinear):
        if module.mode == "gather":
            raise ValueError("a vocab-gathering layer is not a block linear")
        w = module.weight.detach()
        w = w.t() if module.transposed else w
        bias = None if module.bias is None else module.bias.detach()
        return Lin(w, bias, module.mode == "rowwise", module.weight_scale)
    w = module.weight.detach()
    if type(module).__name__ == "Conv1D":           # [in, out]
        w = w.t()
    bias = getattr(module, "bias", None)
    return Lin(w, None if bias is None else bias.detach(), False)


def _row_scales(lin: Lin) -> torch.Tensor:
    """[G, C] group scales -> [out, C] (each row its group's scale): fusable across layers
    whose group sizes differ."""
    return lin.scale.repeat_interleave(lin.out_features // lin.scale.shape[0], dim=0)


def fuse(parts: List[Lin]) -> Optional[Lin]:
    """Colwise layers over the same input -> one Lin with rows [part0 | part1 | ...]; None
    where they cannot share a weight (mixed int8/float, different column groups)."""
    if any(p.rowwise for p in parts) or len({p.weight.dtype for p in parts}) != 1:
        return None
    scale = None
    if parts[0].scale is not None:
        if len({p.scale.shape[1] for p in parts}) != 1 or \
                len({p.scale.dtype for p in parts}) != 1:
            return None
        scale = torch.cat([_row_scales(p) for p in parts])
    bias = None
    if any(p.bias is not None for p in parts):
        like = next(p.bias for p in parts if p.bias is not None)
        bias = torch.cat([p.bias if p.bias is not None else like.new_zeros(p.out_features)
                          for p in parts])
    return Lin(torch.cat([p.weight for p in parts]), bias, False, scale)
