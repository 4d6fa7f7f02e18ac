"""Stand-ins for FoundationVision/Infinity's `Infinity`, `CrossAttnBlock`, `SelfAttention`,
`CrossAttention`, `FlexAttn`, the customised `flash_attn_func` and `apply_rotary_emb`
(class / attribute names, call signatures, the three attention paths, the padding rule and
the dense-bias numerics as in infinity/models/; the code is this project's own, and small:
no text encoder (ca_kv is a plain [B, T, C] tensor), no VAE, no sampling)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, VAR_visible_kvlen=None, VAR_invisible_qlen=None):
    """The customised build's call: [B, L, H, c]; query i sees keys < VAR_visible_kvlen[i]."""
    mask = None
    if VAR_visible_kvlen is not None:
        mask = torch.arange(k.shape[1], device=q.device)[None, :] < VAR_visible_kvlen[:, None].to(q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=softmax_scale)
    return out.transpose(1, 2)


def rope_grid(scale_schedule, head_dim: int, pad_to_multiplier: int) -> torch.Tensor:
    """[2, 1, 1, 1, L_padded, c / 2] cos / sin of angles from each token's (t, h, w) place."""
    rows = []
    for t, h, w in scale_schedule:
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        rows.append(torch.stack((tt / t, hh / h, ww / w), -1).reshape(-1, 3))
    pos = torch.cat(rows)
    L = pos.shape[0]
    pos = F.pad(pos, (0, 0, 0, (-L) % max(1, pad_to_multiplier)))
    freqs = 1.0 / (100.0 ** (torch.arange(head_dim // 2) / (head_dim // 2)))
    angle = (pos.sum(-1, keepdim=True) + pos[:, 1:2] * 3) * freqs * 7
    return torch.stack((angle.cos(), angle.sin()))[:, None, None, None]


def apply_rotary_emb(q, k, scale_schedule, rope2d_freqs_grid, pad_to_multiplier, rope2d_normalized_by_hw, scale_ind):
    qk = torch.stack((q, k))  # 2, B, H, L, c (Infinity reads dim 3 as L)
    L = qk.shape[3]
    start = sum(t * h * w for t, h, w in scale_schedule[:scale_ind])
    key = str(tuple(scale_schedule))
    rope2d_freqs_grid[key] = rope2d_freqs_grid[key].to(qk.device)  # as Infinity: the grid follows q
    cache = rope2d_freqs_grid[key][:, :, :, :, start:start + L]
    pairs = qk.reshape(*qk.shape[:-1], -1, 2)
    turned = torch.stack((cache[0] * pairs[..., 0] - cache[1] * pairs[..., 1],
                          cache[1] * pairs[..., 0] + cache[0] * pairs[..., 1]), -1)
    return turned.reshape(qk.shape).unbind(0)


class FlexAttn(nn.Module):
    """Infinity's FlexAttention mask (same_doc | causal, the padded tail one more document),
    evaluated densely."""
    def __init__(self, block_scales, L: int):
        super().__init__()
        lens = [t * h * w for t, h, w in block_scales]
        doc = torch.repeat_interleave(torch.arange(len(lens) + 1), torch.tensor(lens + [L - sum(lens)]))
        idx = torch.arange(L)
        self.register_buffer("mask", (doc[:, None] == doc[None, :]) | (idx[:, None] >= idx[None, :]))

    def forward(self, q, k, v, scale=None):
        mask = self.mask if q.shape[2] == k.shape[2] else None  # KV-cache inference: every cached key
        return F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v, attn_mask=mask, scale=scale)


class SelfAttention(nn.Module):
    def __init__(self, embed_dim, num_heads, cos_attn=True, customized_flash_attn=False, use_flex_attn=False,
                 pad_to_multiplier=1, rope2d_normalized_by_hw=0):
        super().__init__()
        self.using_flash = customized_flash_attn
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.cos_attn = cos_attn
        if cos_attn:
            self.scale = 1
            size = (1, 1, num_heads, 1) if self.using_flash else (1, num_heads, 1, 1)
            self.scale_mul_1H11 = nn.Parameter(torch.full(size, 4.0).log() + 0.3 * torch.randn(size))
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 1 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(0.1 * torch.randn(embed_dim))
        self.v_bias = nn.Parameter(0.1 * torch.randn(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj, self.proj_drop = nn.Linear(embed_dim, embed_dim), nn.Identity()
        self.caching, self.cached_k, self.cached_v = False, None, None
        self.use_flex_attn, self.pad_to_multiplier = use_flex_attn, pad_to_multiplier
        self.rope2d_normalized_by_hw = rope2d_normalized_by_hw

    def kv_caching(self, enable: bool):
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x, attn_bias_or_two_vector, attn_fn=None, scale_schedule=None, rope2d_freqs_grid=None,
                scale_ind=0):
        # deliberate repeat: of sar_fast.patch.infinity's forward: the stand-in is the upstream model the patch
        # replaces, restated independently
        B, L, C = x.shape
        qkv = F.linear(x, self.mat_qkv.weight, torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)))
        qkv = qkv.view(B, L, 3, self.num_heads, self.head_dim)
        if self.using_flash:
            (q, k, v), L_dim = qkv.unbind(2), 1
        else:
            (q, k, v), L_dim = qkv.permute(2, 0, 3, 1, 4).unbind(0), 2
        if self.cos_attn:
            mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q, k = F.normalize(q, dim=-1, eps=1e-12).mul(mul), F.normalize(k, dim=-1, eps=1e-12)
        if rope2d_freqs_grid is not None:
            q, k = apply_rotary_emb(q, k, scale_schedule, rope2d_freqs_grid, self.pad_to_multiplier,
                                    self.rope2d_normalized_by_hw, scale_ind)
        if self.caching:
            if self.cached_k is None:
                self.cached_k, self.cached_v = k, v
            else:
                k = self.cached_k = torch.cat((self.cached_k, k), dim=L_dim)
                v = self.cached_v = torch.cat((self.cached_v, v), dim=L_dim)
        if self.using_flash:
            kw = {} if attn_bias_or_two_vector is None else dict(VAR_visible_kvlen=attn_bias_or_two_vector[0],
                                                                 VAR_invisible_qlen=attn_bias_or_two_vector[1])
            out = flash_attn_func(q.to(v.dtype), k.to(v.dtype), v, dropout_p=0, softmax_scale=self.scale, **kw)
            out = out.reshape(B, L, C)
        elif self.use_flex_attn and attn_fn is not None:
            out = attn_fn(q, k, v, scale=self.scale).transpose(1, 2).reshape(B, L, C)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias_or_two_vector, scale=self.scale)
            out = out.transpose(1, 2).reshape(B, L, C)
        return self.proj_drop(self.proj(out))


class CrossAttention(nn.Module):
    def __init__(self, embed_dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.mat_q, self.mat_kv = nn.Linear(embed_dim, embed_dim), nn.Linear(embed_dim, 2 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, q, ca_kv):
        B, L, C = q.shape
        q = self.mat_q(q).view(B, L, self.num_heads, -1).transpose(1, 2)
        k, v = self.mat_kv(ca_kv).view(B, ca_kv.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, C))


class CrossAttnBlock(nn.Module):
    def __init__(self, embed_dim, num_heads, mlp_ratio=2, **sa_kw):
        super().__init__()
        self.sa = SelfAttention(embed_dim, num_heads, **sa_kw)
        self.ca = CrossAttention(embed_dim, num_heads)
        hidden = int(mlp_ratio * embed_dim)
        self.ffn = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        self.ln_wo_grad = nn.LayerNorm(embed_dim, elementwise_affine=False)
        self.ca_norm = nn.LayerNorm(embed_dim)
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim ** 0.5)

    def forward(self, x, cond_BD, ca_kv, attn_bias_or_two_vector, attn_fn=None, scale_schedule=None,
                rope2d_freqs_grid=None, scale_ind=0):
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond_BD).unbind(2)
        x_sa = self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1)
        x_sa = self.sa(x_sa, attn_bias_or_two_vector, attn_fn, scale_schedule, rope2d_freqs_grid, scale_ind=scale_ind)
        x = x + x_sa.mul(gamma1)
        x = x + self.ca(self.ca_norm(x), ca_kv)
        return x + self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)).mul(gamma2)


class Infinity(nn.Module):
    """Training forward with Infinity's three attention paths and padding, and a KV-cache pass
    over teacher-forced per-scale inputs (Infinity's sampling loop minus the sampling)."""
    def __init__(self, schedules, embed_dim=128, num_heads=4, depth=2, in_dim=8, vocab=24, cos_attn=True,
                 customized_flash_attn=False, use_flex_attn=False, pad_to_multiplier=0, rope=True, mlp_ratio=2):
        super().__init__()
        self.C, self.pad_to_multiplier = embed_dim, max(1, pad_to_multiplier)
        self.customized_flash_attn, self.use_flex_attn = customized_flash_attn, use_flex_attn
        schedules = [tuple(tuple(b) for b in s) for s in schedules]
        head_dim = embed_dim // num_heads
        self.rope2d_freqs_grid = ({str(s): rope_grid(s, head_dim, self.pad_to_multiplier) for s in schedules}
                                  if rope else None)
        padded = [-(-sum(t * h * w for t, h, w in s) // self.pad_to_multiplier) * self.pad_to_multiplier
                  for s in schedules]
        self.attn_fn_compile_dict = ({s: FlexAttn(s, n) for s, n in zip(schedules, padded)} if use_flex_attn else {})
        if customized_flash_attn:  # per token: keys visible (end of its scale) / queries blind (start of its scale)
            lens = [t * h * w for t, h, w in schedules[0]]
            ends = torch.cumsum(torch.tensor(lens), 0)
            self.register_buffer("Infinity_visible_kvlen", torch.repeat_interleave(ends, torch.tensor(lens)).int(),
                                 persistent=False)
            self.register_buffer("Infinity_invisible_qlen",
                                 torch.repeat_interleave(ends - torch.tensor(lens), torch.tensor(lens)).int(),
                                 persistent=False)
        self.word_embed = nn.Linear(in_dim, embed_dim)
        self.pos_start = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.1)
        self.lvl_embed = nn.Embedding(16, embed_dim)
        self.shared_ada_lin = nn.Linear(embed_dim, 6 * embed_dim)
        self.unregistered_blocks = [CrossAttnBlock(embed_dim, num_heads, mlp_ratio, cos_attn=cos_attn,
                                                   customized_flash_attn=customized_flash_attn,
                                                   use_flex_attn=use_flex_attn, pad_to_multiplier=pad_to_multiplier)
                                    for _ in range(depth)]
        self.blocks = nn.ModuleList(self.unregistered_blocks)
        self.head = nn.Linear(embed_dim, vocab)

    def add_lvl_embeding_for_x_BLC(self, x, scale_schedule):
        ids = torch.cat([torch.full((t * h * w,), i, device=x.device) for i, (t, h, w) in enumerate(scale_schedule)])
        return torch.cat((x[:, :len(ids)] + self.lvl_embed(ids), x[:, len(ids):]), dim=1)

    def forward(self, x_BLC_wo_prefix, scale_schedule, cond_BD, ca_kv):
        B = x_BLC_wo_prefix.shape[0]
        x = torch.cat((self.pos_start.expand(B, 1, -1) + cond_BD[:, None], self.word_embed(x_BLC_wo_prefix)), 1)
        l_end = x.shape[1]
        need_to_pad = -(-l_end // self.pad_to_multiplier) * self.pad_to_multiplier - l_end
        if self.customized_flash_attn:
            bias = (self.Infinity_visible_kvlen[:l_end], self.Infinity_invisible_qlen[:l_end])
        elif self.use_flex_attn:
            x = F.pad(x, (0, 0, 0, need_to_pad))
            assert x.shape[-1] % 128 == 0
            bias = None
        else:
            d = torch.cat([torch.full((t * h * w,), i) for i, (t, h, w) in enumerate(scale_schedule)]).view(1, l_end, 1)
            bias = torch.where(d >= d.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, l_end, l_end)
            if need_to_pad:
                bias = F.pad(bias, (0, need_to_pad, 0, need_to_pad), value=-torch.inf)
                bias[0, 0, l_end:, 0] = 0
                x = F.pad(x, (0, 0, 0, need_to_pad))
            bias = bias.type_as(x).to(x.device)
        attn_fn = self.attn_fn_compile_dict[tuple(scale_schedule)] if self.use_flex_attn else None
        gss = self.shared_ada_lin(cond_BD).view(B, 1, 6, self.C)
        x = self.add_lvl_embeding_for_x_BLC(x, scale_schedule)
        for b in self.blocks:
            x = b(x=x, cond_BD=gss, ca_kv=ca_kv, attn_bias_or_two_vector=bias, attn_fn=attn_fn,
                  scale_schedule=scale_schedule, rope2d_freqs_grid=self.rope2d_freqs_grid)
        return self.head(x[:, :l_end])

    @torch.no_grad()
    def infer_teacher_forced(self, x_BLC_wo_prefix, scale_schedule, cond_BD, ca_kv):
        """Scale by scale through the KV cache; the logits of every scale, concatenated."""
        B = cond_BD.shape[0]
        for b in self.unregistered_blocks:
            b.sa.kv_caching(True)
        gss = self.shared_ada_lin(cond_BD).view(B, 1, 6, self.C)
        inputs = self.word_embed(x_BLC_wo_prefix)
        logits, start = [], 0
        for si, (t, h, w) in enumerate(scale_schedule):
            n = t * h * w
            x = self.pos_start.expand(B, 1, -1) + cond_BD[:, None] if si == 0 else inputs[:, start - 1:start - 1 + n]
            x = x + self.lvl_embed(torch.full((n,), si, device=x.device))
            prefix = tuple(scale_schedule[:si + 1])
            attn_fn = self.attn_fn_compile_dict.get(prefix, None) if self.use_flex_attn else None
            for b in self.blocks:
                x = b(x=x, cond_BD=gss, ca_kv=ca_kv, attn_bias_or_two_vector=None, attn_fn=attn_fn,
                      scale_schedule=scale_schedule, rope2d_freqs_grid=self.rope2d_freqs_grid, scale_ind=si)
            logits.append(self.head(x))
            start += n
        for b in self.unregistered_blocks:
            b.sa.kv_caching(False)
        return torch.cat(logits, 1)
