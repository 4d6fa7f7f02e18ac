"""The transformer's building blocks: AdaLN self-attention blocks, the AdaLN head norm,
the per-block KV cache that sampling fills scale by scale, and the fp32 head.

Separate from transformer.py so that generation (generate.py) can use the cache and the
head without importing the model that calls it.

Precision, as the original models train under autocast: the residual stream, the layer
norms, the AdaLN modulation of the normalised stream and the q/k L2 normalisation run in
fp32; every GEMM takes its operands in the parameters' dtype (bf16 when FSDP's mixed
precision casts the parameters, with `cast_forward_inputs` off so the fp32 residual stays
fp32), and a branch's output is added back to the fp32 residual.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x) with x cast to the layer's parameter dtype: an fp32 activation meets bf16
    weights as under autocast (bf16 GEMM, fp32 accumulation)."""
    return F.linear(x.to(layer.weight.dtype), layer.weight, layer.bias)


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.fc2, F.gelu(linear(self.fc1, x), approximate="tanh"))


class SelfAttention(nn.Module):
    """Multi-head attention with q/k/v biases (k's fixed at zero) and, with attn_l2_norm,
    L2-normalised q and k, q scaled per head by exp(min(s_h, log 100))."""

    def __init__(self, dim: int, num_heads: int, l2_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim, self.l2_norm = num_heads, dim // num_heads, l2_norm
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        if l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
            self.softmax_scale = 1.0
        else:
            self.softmax_scale = 0.25 / math.sqrt(self.head_dim)
        self._max_log_scale = math.log(100.0)

    def forward(self, x: torch.Tensor, scale_lens: Sequence[int] | ops.ScaleLayout | None,
                cache: KVCache | None = None) -> torch.Tensor:
        B, L, C = x.shape
        weight = self.mat_qkv.weight
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias)).to(weight.dtype)
        qkv = F.linear(x.to(weight.dtype), weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B, H, L, hd
        if self.l2_norm:  # in fp32 (autocast runs the norm in fp32 too), attention in v's dtype
            scale = self.scale_mul_1H11.float().clamp_max(self._max_log_scale).exp()
            q = (F.normalize(q.float(), dim=-1) * scale).to(v.dtype)
            k = F.normalize(k.float(), dim=-1).to(v.dtype)
        if cache is not None:  # sampling: append this scale to the cache, attend to all of it
            if cache.k is not None:
                k = torch.cat((cache.k, k), dim=2)
                v = torch.cat((cache.v, v), dim=2)
            cache.k, cache.v = k, v
            out = ops.cached_attention(q, k, v, softmax_scale=self.softmax_scale)
        else:
            out = ops.scale_causal_attention(q, k, v, scale_lens, softmax_scale=self.softmax_scale)
        return linear(self.proj, out.transpose(1, 2).reshape(B, L, C))


class AdaLNSelfAttn(nn.Module):
    """x += gamma1 * attn(LN(x) * (1 + scale1) + shift1); x += gamma2 * ffn(... 2);
    the six modulations come from the class embedding."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_eps: float,
                 l2_norm: bool, drop_path: float):
        super().__init__()
        self.dim, self.norm_eps, self.drop_path = dim, norm_eps, drop_path
        self.attn = SelfAttention(dim, num_heads, l2_norm)
        self.ffn = FFN(dim, round(dim * mlp_ratio))
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def drop_path_scales(self, uniforms: torch.Tensor) -> torch.Tensor | None:
        """Per-row multipliers [B, 2] (attention, FFN branch) from uniforms [B, 2]: 0 for a
        dropped branch, 1 / keep otherwise; None when drop-path is off."""
        if not self.training or self.drop_path == 0.0:
            return None
        keep = 1.0 - self.drop_path
        return (uniforms < keep).float() / keep

    def forward(self, x: torch.Tensor, cond: torch.Tensor, scale_lens: Sequence[int] | ops.ScaleLayout | None,
                cache: KVCache | None = None, drop_scales: torch.Tensor | None = None) -> torch.Tensor:
        """drop_scales [B, 2]: drop-path multipliers (see drop_path_scales); without them a
        training block draws its own from the global RNG."""
        if drop_scales is None and self.training and self.drop_path > 0.0:
            drop_scales = self.drop_path_scales(torch.rand(x.shape[0], 2, device=x.device))
        gamma1, gamma2, scale1, scale2, shift1, shift2 = \
            linear(self.ada_lin[1], self.ada_lin[0](cond)).view(-1, 1, 6, self.dim).unbind(2)
        h = F.layer_norm(x, (self.dim,), eps=self.norm_eps) * (scale1 + 1) + shift1
        branch = self.attn(h, scale_lens, cache) * gamma1
        x = x + (branch if drop_scales is None else branch * drop_scales[:, 0, None, None])
        h = F.layer_norm(x, (self.dim,), eps=self.norm_eps) * (scale2 + 1) + shift2
        branch = self.ffn(h) * gamma2
        return x + (branch if drop_scales is None else branch * drop_scales[:, 1, None, None])


class AdaLNBeforeHead(nn.Module):
    def __init__(self, dim: int, norm_eps: float):
        super().__init__()
        self.dim, self.norm_eps = dim, norm_eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """In fp32 whatever the parameter dtype (VAR computes the head's input in float)."""
        mod = linear(self.ada_lin[1], self.ada_lin[0](cond)).float()
        scale, shift = mod.view(-1, 1, 2, self.dim).unbind(2)
        return F.layer_norm(x.float(), (self.dim,), eps=self.norm_eps) * (scale + 1) + shift


class KVCache:
    """One block's keys and values of the scales generated so far. A plain object (not a
    dict) on purpose: FSDP's input casting rebuilds containers, which would drop updates."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None


def apply_head(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """Logits in fp32 from the (fp32) head input, in the head's parameter dtype."""
    return F.linear(hidden.to(head.weight.dtype), head.weight, head.bias).float()
