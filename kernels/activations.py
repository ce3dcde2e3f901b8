"""Fused bias + activation, and the SiLU gate of gated MLPs, elementwise over rows.

    bias_act(x, bias, act) = act(x + bias)       act: gelu_tanh | gelu | relu | silu | identity
    silu_mul(a, b)         = silu(a) * b         (Llama-style gate; b=None splits a's last dim
                                                  in halves [gate | up], a packed gate_up output)
Maths in fp32, one rounding to the output dtype. gelu_tanh uses 0.5 * (1 + tanh(u)) = sigmoid(2u).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, tl, triton  # noqa: F401
from ._triton import interpreting as _interpreting  # noqa: F401
from ._triton import use_triton as _use_triton
from ._triton import pdl_args, pdl_wait_then_release


ACTIVATIONS = ("gelu_tanh", "gelu", "relu", "silu", "identity")


@triton.jit
def _act(x, ACT: tl.constexpr):
    # x fp32 -> act(x) fp32
    y = x
    if ACT == "gelu_tanh":
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)   # sqrt(2/pi) * (x + 0.044715 x^3)
        y = x * tl.sigmoid(2.0 * u)
    elif ACT == "gelu":
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))  # x / sqrt(2)
    elif ACT == "relu":
        y = tl.maximum(x, 0.0)
    elif ACT == "silu":
        y = x * tl.sigmoid(x)
    return y


@triton.jit
def _bias_act_kernel(
    x_ptr,        # [R, N] input (row stride stride_x, features contiguous)
    b_ptr,        # [N] bias (unused unless HAS_BIAS)
    y_ptr,        # [R, N] output (contiguous)
    N, stride_x,
    ACT: tl.constexpr,            # one of ACTIVATIONS
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,          # features per program
    PDL: tl.constexpr = False,   # programmatic dependent launch (_triton.py)
):
    pdl_wait_then_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + cols, _act(x, ACT).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_kernel(
    a_ptr,        # [R, N] gate (row stride stride_a)
    b_ptr,        # [R, N] up (row stride stride_b)
    y_ptr,        # [R, N] output (contiguous)
    N, stride_a, stride_b,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,   # programmatic dependent launch (_triton.py)
):
    pdl_wait_then_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    a = tl.load(a_ptr + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + cols, (a * tl.sigmoid(a) * b).to(y_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _out(out, shape, like, what):
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or not out.is_contiguous():
        raise ValueError(f"{what}: out must be a contiguous {like.dtype} tensor of shape "
                         f"{tuple(shape)}")
    return out


def bias_act(x: torch.Tensor, bias: Optional[torch.Tensor] = None, act: str = "gelu_tanh",
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """act(x + bias) over x [..., N]; act in ACTIVATIONS ("gelu" is the exact erf GELU)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"bias_act: unknown activation {act!r}; known: {', '.join(ACTIVATIONS)}")
    N = x.shape[-1]
    if bias is not None and (tuple(bias.shape) != (N,) or bias.device != x.device):
        raise ValueError(f"bias_act: bias must be [{N}] on {x.device}, got {tuple(bias.shape)}")
    if not _use_triton(x):
        y = bias_act_ref(x, bias, act)
        return y if out is None else out.copy_(y)
    y = _out(out, x.shape, x, "bias_act")
    x2 = _rows(x)
    BLOCK = min(triton.next_power_of_2(N), 2048)
    if x2.numel():
        _bias_act_kernel[(x2.shape[0], triton.cdiv(N, BLOCK))](
            x2, bias if bias is not None else x2, y, N, x2.stride(0),
            ACT=act, HAS_BIAS=bias is not None, BLOCK=BLOCK, num_warps=4, **pdl_args(x2))
    return y


def silu_mul(a: torch.Tensor, b: Optional[torch.Tensor] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(a) * b; with b None, a is [..., 2N] packed [gate | up] and the result is [..., N]."""
    if b is None:
        if a.shape[-1] % 2:
            raise ValueError(f"silu_mul: packed gate|up needs an even last dim, got {a.shape[-1]}")
        a, b = a.chunk(2, dim=-1)
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"silu_mul: gate {tuple(a.shape)} {a.dtype} and up {tuple(b.shape)} "
                         f"{b.dtype} must match")
    if not _use_triton(a):
        y = silu_mul_ref(a, b)
        return y if out is None else out.copy_(y)
    N = a.shape[-1]
    y = _out(out, a.shape, a, "silu_mul")
    a2, b2 = _rows(a), _rows(b)
    BLOCK = min(triton.next_power_of_2(N), 2048)
    if a2.numel():
        _silu_mul_kernel[(a2.shape[0], triton.cdiv(N, BLOCK))](
            a2, b2, y, N, a2.stride(0), b2.stride(0), BLOCK=BLOCK, num_warps=4,
            **pdl_args(a2))
    return y


def bias_act_ref(x: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 act: str = "gelu_tanh") -> torch.Tensor:
    h = x.float() if bias is None else x.float() + bias.float()
    fn = {"gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu,
          "relu": F.relu, "silu": F.silu, "identity": lambda t: t}[act]
    return fn(h).to(x.dtype)


def silu_mul_ref(a: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    if b is None:
        a, b = a.chunk(2, dim=-1)
    return (F.silu(a.float()) * b.float()).to(a.dtype)
