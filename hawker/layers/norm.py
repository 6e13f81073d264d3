"""RMSNorm computed in float32, as the reference implementations do (eager bfloat16 rows on a CPU in one
pass by hawker/kernels/rowwise.py, which rounds where this code does)."""

from __future__ import annotations

import torch
from torch import nn

from hawker.kernels import rowwise


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)

    def checkpoint_shape(self, name: str, shard: int = 0) -> tuple[int, ...]:
        del name, shard
        return tuple(self.weight.shape)

    def load(self, name: str, full: torch.Tensor, shard: int = 0) -> None:
        del name, shard
        self.weight.data.copy_(full[:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if rowwise.serves(x):
            return rowwise.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
