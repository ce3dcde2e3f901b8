"""The int8 reference: error bound, group layout, scale dtypes (property-based)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsinfer.kernels import QMAX, dequantize_ref, quantize_ref


@st.composite
def weights(draw):
    groups = draw(st.integers(1, 4))
    rows = groups * draw(st.integers(1, 4))
    k = draw(st.sampled_from([None, 2, 4]))
    cols = (k or 1) * draw(st.integers(1, 4))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    seed = draw(st.integers(0, 2 ** 16))
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    if draw(st.booleans()):
        w[0] = 0  # an all-zero block must not divide by zero
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    return w.to(dtype), groups, k


@settings(max_examples=80, deadline=None)
@given(weights(), st.sampled_from([torch.float32, torch.float16]))
def test_error_within_half_a_step(case, scale_dtype):
    w, groups, k = case
    q, s = quantize_ref(w, groups, k, scale_dtype)
    assert q.dtype == torch.int8 and s.dtype == scale_dtype
    assert s.shape == (groups, w.shape[1] // k if k else 1)
    assert q.abs().max() <= QMAX
    step = s.float().repeat_interleave(w.shape[0] // groups, 0)
    step = step.repeat_interleave(w.shape[1] // step.shape[1], 1)
    err = (w.float() - dequantize_ref(q, s)).abs()
    # half a step, up to fp32 rounding of w/s and q*s at exact .5 ties (a few ulp)
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-30).all())


def test_groups_are_contiguous_row_blocks():
    w = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 100.0)])
    q, s = quantize_ref(w, 2)
    assert torch.allclose(s[:, 0], torch.tensor([1 / 127, 100 / 127]))
    assert (q == 127).all()


@pytest.mark.parametrize("bad", [(3, None), (2, 3)])
def test_bad_geometry(bad):
    with pytest.raises(ValueError):
        quantize_ref(torch.randn(4, 10), *bad)
