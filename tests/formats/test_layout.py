"""shard/unshard are exact inverses for plain and packed splits (property-based)."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsinfer.formats.layout import Placement, shard, shard_rows, unshard


@st.composite
def cases(draw):
    tp = draw(st.sampled_from([1, 2, 3, 4]))
    nparts = draw(st.integers(1, 3))
    sizes = tuple(tp * draw(st.integers(1, 3)) for _ in range(nparts))
    other = draw(st.integers(1, 5))
    dim = draw(st.integers(0, 1))
    shape = [other, other]
    shape[dim] = sum(sizes)
    return tp, dim, (sizes if nparts > 1 else None), shape


@settings(max_examples=60, deadline=None)
@given(cases())
def test_unshard_inverts_shard(case):
    tp, dim, parts, shape = case
    t = torch.randn(shape)
    p = Placement(dim, parts)
    pieces = [shard(t, p, tp, r) for r in range(tp)]
    assert all(x.shape == p.shard_shape(shape, tp) for x in pieces)
    assert torch.equal(unshard(pieces, p), t)
    if dim == 0:  # row ranges read the same rows
        for r in range(tp):
            rows = torch.cat([t[a:b] for a, b in shard_rows(p, shape, tp, r)])
            assert torch.equal(rows, pieces[r])


def test_packed_split_keeps_parts_together():
    t = torch.arange(12)  # [Q0 Q1 Q2 Q3 | K.. | V..] with 4 rows each
    p = Placement(0, (4, 4, 4))
    assert shard(t, p, 2, 0).tolist() == [0, 1, 4, 5, 8, 9]
    assert shard(t, p, 2, 1).tolist() == [2, 3, 6, 7, 10, 11]


def test_divisible():
    assert Placement(0, (4, 4, 4)).divisible((12, 3), 2)
    assert not Placement(0, (6, 6)).divisible((12, 3), 4)
    assert not Placement(1).divisible((4, 6), 4)
    assert Placement(None).divisible((5,), 7)
    assert Placement.from_json(Placement(1, (2, 2)).to_json()) == Placement(1, (2, 2))
