"""Triton kernels of the GPU path, and the fused ops that pick them or their torch fallback."""
