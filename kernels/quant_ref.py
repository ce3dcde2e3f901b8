"""Grouped symmetric int8 quantization (MoQ-style): the torch reference every kernel matches.

A weight is viewed as [out, in] (output features first). Its rows are cut into `groups`
contiguous blocks of out/groups rows; with `group_size` K each row is also cut into blocks of K
columns, giving scales of shape [groups, in/K] (col_groups = 1 without K). Per block:

    s = absmax(block) / 127        (fp32; an all-zero block gets s = 0 and q = 0)
    q = clamp(round(w / s), -127, 127)   as int8, round half to even
    w ~ q * s

so |w - q*s| <= s/2 for every element.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

QMAX = 127


def _blocks(w: torch.Tensor, groups: int, col_groups: int) -> torch.Tensor:
    out, inp = w.shape
    # [out, in] -> [groups, rows_per_group, col_groups, cols_per_group]
    return w.reshape(groups, out // groups, col_groups, inp // col_groups)


def check_geometry(shape, groups: int, group_size: Optional[int]) -> int:
    """Validates the block layout of an [out, in] weight; returns col_groups."""
    out, inp = shape
    if groups < 1 or out % groups:
        raise ValueError(f"{groups} groups do not divide {out} rows")
    if group_size is None:
        return 1
    if group_size < 1 or inp % group_size:
        raise ValueError(f"group size {group_size} does not divide {inp} columns")
    return inp // group_size


def quantize_ref(w: torch.Tensor, groups: int, group_size: Optional[int] = None,
                 scale_dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] (any float dtype) -> (q int8 [out, in], scale [groups, col_groups])."""
    col_groups = check_geometry(w.shape, groups, group_size)
    b = _blocks(w.to(torch.float32, copy=True), groups, col_groups)   # a private fp32 copy
    exact = torch.maximum(b.amax(dim=(1, 3)), -b.amin(dim=(1, 3))) / QMAX  # [groups, col_groups]
    stored = exact.to(scale_dtype)
    # A narrower scale dtype may round down; step up one ulp so |w/s| never exceeds 127.
    stored = torch.where(stored.float() < exact, torch.nextafter(stored, stored.new_tensor(
        float("inf"))), stored)
    scale = stored.float()  # quantize with the scale exactly as stored
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None, :, None]
    q = b.div_(safe).round_().clamp_(-QMAX, QMAX).to(torch.int8)   # in place on the copy
    return q.reshape(w.shape), scale.to(scale_dtype)


def dequantize_ref(q: torch.Tensor, scale: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q int8 [out, in], scale [groups, col_groups]) -> w_hat [out, in] in `dtype`."""
    groups, col_groups = scale.shape
    b = _blocks(q.float(), groups, col_groups) * scale.float()[:, None, :, None]
    return b.reshape(q.shape).to(dtype)
