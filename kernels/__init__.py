"""Kernels, each with a torch reference implementation (`*_ref`).

The Triton kernels land with the kernels issue; the references here define the maths they
must match and run wherever there is no GPU."""
from .quant_ref import QMAX, check_geometry, dequantize_ref, quantize_ref

__all__ = ["QMAX", "check_geometry", "dequantize_ref", "quantize_ref"]

# Triton kernels (wrappers fall back to their references on CPU unless TRITON_INTERPRET=1).
from .activations import ACTIVATIONS, bias_act, bias_act_ref, silu_mul, silu_mul_ref
from .attention import (attention_ref, decode_attention, decode_attention_ref, prefill_attention,
                        prefill_attention_ref, write_kv)
from .int8_gemm import decode_linear, dequantize, gemv, int8_linear, int8_linear_ref, linear_ref
from .kv_write import qkv_to_cache, qkv_to_cache_ref, split_heads
from .norms import NORMS, add_norm, add_norm_ref
from .rotary import STYLES, apply_rotary, apply_rotary_ref, rotary_cache

__all__ += ["ACTIVATIONS", "bias_act", "bias_act_ref", "silu_mul", "silu_mul_ref",
            "attention_ref", "decode_attention", "decode_attention_ref", "prefill_attention",
            "prefill_attention_ref", "write_kv", "decode_linear", "dequantize", "gemv",
            "int8_linear", "int8_linear_ref", "linear_ref", "qkv_to_cache", "qkv_to_cache_ref",
            "split_heads", "NORMS", "add_norm", "add_norm_ref", "STYLES", "apply_rotary",
            "apply_rotary_ref", "rotary_cache"]
