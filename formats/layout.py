"""How one tensor is cut across tensor-parallel ranks, and put back together.

A `Placement` says along which dim a tensor is split (None = every rank holds all of it) and,
for packed tensors, the global sizes of the parts laid end to end along that dim (GPT-2's
c_attn holds [Q | K | V] along its output features). Each part is cut into `tp` contiguous
chunks and rank r holds chunk r of every part, in part order:

    global  [ Q0 Q1 | K0 K1 | V0 V1 ]      (tp = 2)
    rank 0  [ Q0 | K0 | V0 ]   rank 1 [ Q1 | K1 | V1 ]

A plain split is the one-part case. Split and merge are exact inverses (pure slicing).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

if TYPE_CHECKING:  # imported inside shard/unshard only: Placement is needed without torch
    import torch


@dataclasses.dataclass(frozen=True)
class Placement:
    split_dim: Optional[int] = None
    parts: Optional[Tuple[int, ...]] = None  # global part sizes along split_dim; None = one part

    @property
    def replicated(self) -> bool:
        return self.split_dim is None

    def part_sizes(self, shape: Sequence[int]) -> Tuple[int, ...]:
        return self.parts if self.parts else (shape[self.split_dim],)

    def divisible(self, shape: Sequence[int], tp: int) -> bool:
        if self.replicated:
            return True
        if self.split_dim >= len(shape) or sum(self.part_sizes(shape)) != shape[self.split_dim]:
            return False
        return all(p % tp == 0 for p in self.part_sizes(shape))

    def shard_shape(self, shape: Sequence[int], tp: int) -> Tuple[int, ...]:
        if self.replicated:
            return tuple(shape)
        out = list(shape)
        out[self.split_dim] = shape[self.split_dim] // tp
        return tuple(out)

    def to_json(self) -> dict:
        d = {"split_dim": self.split_dim}
        if self.parts:
            d["parts"] = list(self.parts)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Placement":
        parts = d.get("parts")
        return cls(d.get("split_dim"), tuple(parts) if parts else None)


def shard(t: "torch.Tensor", p: Placement, tp: int, rank: int) -> "torch.Tensor":
    """Rank `rank`'s piece of the global tensor `t` (a view where possible)."""
    import torch
    if p.replicated or tp == 1:
        return t
    pieces, start = [], 0
    for size in p.part_sizes(t.shape):
        chunk = size // tp
        pieces.append(t.narrow(p.split_dim, start + rank * chunk, chunk))
        start += size
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=p.split_dim)


def shard_rows(p: Placement, shape: Sequence[int], tp: int, rank: int) -> List[Tuple[int, int]]:
    """For a dim-0 split: the [start, stop) row ranges of the global tensor that rank holds."""
    assert p.split_dim == 0
    return shard_ranges(p, shape, tp, rank)


def shard_ranges(p: Placement, shape: Sequence[int], tp: int, rank: int
                 ) -> List[Tuple[int, int]]:
    """The [start, stop) index ranges along `p.split_dim` of the global tensor that rank
    holds, one per part, in the order the rank stores them."""
    assert not p.replicated
    out, start = [], 0
    for size in p.part_sizes(shape):
        chunk = size // tp
        out.append((start + rank * chunk, start + (rank + 1) * chunk))
        start += size
    return out


def unshard(shards: List["torch.Tensor"], p: Placement) -> "torch.Tensor":
    """The global tensor from every rank's piece, in rank order (inverse of `shard`)."""
    import torch
    if p.replicated or len(shards) == 1:
        return shards[0]
    tp = len(shards)
    local_parts = [s // tp for s in p.parts] if p.parts else [shards[0].shape[p.split_dim]]
    pieces = []
    offset = 0
    for size in local_parts:
        pieces.extend(s.narrow(p.split_dim, offset, size) for s in shards)
        offset += size
    return torch.cat(pieces, dim=p.split_dim)
