"""Triton kernels, each with a torch reference (added by the kernels issue)."""
