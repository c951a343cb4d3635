"""Triton kernels of moe_align (installed as ``moe_align.kernels``), one op family per module."""

# Passed to every launch: contract a * b + c into fused multiply-adds, the numerics the kernels are
# tested and timed with. Triton defaults to it up to 3.9 and warns that 3.10 turns the default off.
# TRITON_FORCE_DISABLE_FP_FUSION=1 still turns it off (Triton 3.9 on) for a numerics comparison.
ENABLE_FP_FUSION = True
