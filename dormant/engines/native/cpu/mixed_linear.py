"""A Linear that keeps a bf16 copy of its weight for steps of few tokens.

On CPUs without AVX512-bf16 (our 2-core EPYC), bf16 GEMV reads half the bytes and is 2.5x
faster at one row, but bf16 GEMM gets slower per row while fp32 GEMM stays flat (figures in
core/config.py). So: few rows -> bf16 copy, else the fp32 weight. Both live in the same arena.

Only decode steps take the bf16 copy (the runner sets `SmallRows.limit` per step): a prompt
always runs fp32, however few of its tokens are left after a prefix-cache hit, so a cached
prompt is computed as an uncached one is (issue 11: greedy output differed with the cache; the
row tiles in cpu/attention.py are the other half).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SmallRows:
    """The most rows a step may run on the bf16 copies; one object shared by every MixedLinear."""

    def __init__(self, limit: int) -> None:
        self.small_batch_tokens = limit
        self.limit = limit

    def set_step(self, is_decode: bool) -> None:
        self.limit = self.small_batch_tokens if is_decode else 0


class MixedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, small_weight: torch.Tensor, small_rows: SmallRows):
        super().__init__()
        self.weight = linear.weight  # the same Parameter (tied weights stay tied)
        self.bias = linear.bias
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.small_weight = small_weight
        self.small_bias = None if linear.bias is None else linear.bias.to(torch.bfloat16)
        self.small_rows = small_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows <= self.small_rows.limit:
            # The bf16 output is left as is: the next fp32 op (residual add, RoPE, norm) promotes
            # it, and skipping ~200 casts per step saves ~1.5 ms at one row.
            return F.linear(x.to(torch.bfloat16), self.small_weight, self.small_bias)
        return F.linear(x, self.weight, self.bias)
