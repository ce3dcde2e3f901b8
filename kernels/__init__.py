"""Kernels, each with a torch reference implementation (`*_ref`).

The Triton kernels land with the kernels issue; the references here define the maths they
must match and run wherever there is no GPU."""
from .quant_ref import QMAX, check_geometry, dequantize_ref, quantize_ref

__all__ = ["QMAX", "check_geometry", "dequantize_ref", "quantize_ref"]
