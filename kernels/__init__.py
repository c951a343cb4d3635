"""Triton kernels of moe_align (installed as ``moe_align.kernels``), one op family per module."""
