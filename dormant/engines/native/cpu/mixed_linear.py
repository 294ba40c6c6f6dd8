"""A Linear that keeps a bf16 copy of its weight for steps of few tokens.

On CPUs without AVX512-bf16 (our 2-core EPYC), bf16 GEMV reads half the bytes and is 2.5x
faster at one row, but bf16 GEMM gets slower per row while fp32 GEMM stays flat (figures in
core/config.py). So: few rows -> bf16 copy, else the fp32 weight. Both live in the same arena.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MixedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, small_weight: torch.Tensor, small_batch_tokens: int):
        super().__init__()
        self.weight = linear.weight  # the same Parameter (tied weights stay tied)
        self.bias = linear.bias
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.small_weight = small_weight
        self.small_bias = None if linear.bias is None else linear.bias.to(torch.bfloat16)
        self.small_batch_tokens = small_batch_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows <= self.small_batch_tokens:
            # The bf16 output is left as is: the next fp32 op (residual add, RoPE, norm) promotes
            # it, and skipping ~200 casts per step saves ~1.5 ms at one row.
            return F.linear(x.to(torch.bfloat16), self.small_weight, self.small_bias)
        return F.linear(x, self.weight, self.bias)
