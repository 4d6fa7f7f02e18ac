"""Convolutional building blocks shared by the two tokenizers.

Both VQ-16 (LlamaGen, used by FlexVAR) and VAR's VQVAE descend from the taming /
latent-diffusion autoencoder: GroupNorm(eps=1e-6) + swish pre-activation residual blocks,
single-head spatial self-attention at the coarsest level, stride-2 convs with a
right/bottom zero pad to go down, nearest x2 + conv to go up. Attribute names here are
the ones both checkpoints use (norm1, conv1, norm2, conv2, nin_shortcut, proj_out, conv).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

Activation = Callable[[torch.Tensor], torch.Tensor]


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), spelled out: LlamaGen's form. F.silu (VAR's form) is the same
    function but rounds differently in the last bit; each tokenizer keeps its original's
    form so that, on CPU, outputs match the original bit for bit."""
    return x * torch.sigmoid(x)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(f"norm_groups={groups} must divide every channel count, got {channels} channels")
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def conv3x3(c_in: int, c_out: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=padding)


class ResBlock(nn.Module):
    """x + conv(swish(norm(conv(swish(norm(x)))))); a 1x1 `nin_shortcut` when widths differ."""

    def __init__(self, c_in: int, c_out: int, groups: int, act: Activation):
        super().__init__()
        self.act = act
        self.norm1 = group_norm(c_in, groups)
        self.conv1 = conv3x3(c_in, c_out)
        self.norm2 = group_norm(c_out, groups)
        self.conv2 = conv3x3(c_out, c_out)
        # VAR stores an nn.Identity here (no keys); LlamaGen stores nothing. Same state dict.
        self.nin_shortcut = nn.Conv2d(c_in, c_out, kernel_size=1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))  # dropout is 0 in both released models
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class SelfAttention2d(nn.Module):
    """Single-head attention over all h*w positions, scale C^-1/2, residual.

    `fused_qkv=True` keeps VAR's layout (one `qkv` 1x1 conv, output channels ordered
    q, k, v); False keeps LlamaGen's separate `q`, `k`, `v` convs.
    """

    def __init__(self, channels: int, groups: int, fused_qkv: bool):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        else:
            self.q = nn.Conv2d(channels, channels, kernel_size=1)
            self.k = nn.Conv2d(channels, channels, kernel_size=1)
            self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if self.fused_qkv:
            q, k, v = self.qkv(h).chunk(3, dim=1)
        else:
            q, k, v = self.q(h), self.k(h), self.v(h)
        # Explicit softmax(q^T k / sqrt(C)) in the originals' operation order (bit-exact on
        # CPU); at most 16x16 = 256 positions, so the [B, HW, HW] weights are small.
        q, k, v = (t.reshape(B, C, H * W) for t in (q, k, v))
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * C ** -0.5, dim=2)  # [B, query, key]
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample2x(nn.Module):
    """Stride-2 3x3 conv after padding one zero row/column at the bottom/right."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
