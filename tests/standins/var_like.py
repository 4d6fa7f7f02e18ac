"""Stand-ins for VAR's `VAR`, `AdaLNSelfAttn`, `SelfAttention`, `AdaLNBeforeHead`, `VQVAE`
and `VectorQuantizer2` (names, attributes and numerics as in FoundationVision/VAR; the code
is this project's own). Attention runs as VAR's non-flash path: SDPA with the float mask."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def block_causal_bias(patch_nums) -> torch.Tensor:
    """[1, 1, L, L] float: 0 where a token's scale >= the key's scale, -inf elsewhere."""
    level = torch.cat([torch.full((p * p,), float(i)) for i, p in enumerate(patch_nums)])
    visible = level[:, None] >= level[None, :]
    return torch.where(visible, 0.0, float("-inf"))[None, None].contiguous()


class SelfAttention(nn.Module):
    def __init__(self, block_idx, embed_dim, num_heads, attn_drop=0.0, proj_drop=0.0, attn_l2_norm=True):
        super().__init__()
        self.block_idx, self.num_heads = block_idx, num_heads
        self.head_dim = embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:  # cosine attention with a learned per-head gain, capped at 100
            self.scale = 1
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop
        self.using_flash = self.using_xform = False
        self.caching, self.cached_k, self.cached_v = False, None, None

    def kv_caching(self, enable: bool):
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x, attn_bias):
        B, L, C = x.shape
        in_bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        heads = F.linear(x, self.mat_qkv.weight, in_bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = heads.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, D]
        if self.attn_l2_norm:
            gain = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q, k = F.normalize(q, dim=-1) * gain, F.normalize(k, dim=-1)
        if self.caching:
            if self.cached_k is not None:
                k, v = torch.cat((self.cached_k, k), dim=2), torch.cat((self.cached_v, v), dim=2)
            self.cached_k, self.cached_v = k, v
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=drop, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, C)))


class FFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)
        self.drop = nn.Identity()

    def forward(self, x):
        return self.drop(self.fc2(self.act(self.fc1(x))))


class AdaLNSelfAttn(nn.Module):
    def __init__(self, block_idx, embed_dim, cond_dim, num_heads, mlp_ratio=4.0, attn_drop=0.0,
                 attn_l2_norm=True):
        super().__init__()
        self.block_idx, self.C, self.D = block_idx, embed_dim, cond_dim
        self.drop_path = nn.Identity()
        self.attn = SelfAttention(block_idx, embed_dim, num_heads, attn_drop=attn_drop, attn_l2_norm=attn_l2_norm)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=1e-6, elementwise_affine=False)
        self.shared_aln = False
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * embed_dim))
        self.fused_add_norm_fn = None

    def forward(self, x, cond_BD, attn_bias):
        g1, g2, s1, s2, b1, b2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        x = x + self.drop_path(self.attn(self.ln_wo_grad(x) * (s1 + 1) + b1, attn_bias=attn_bias) * g1)
        return x + self.drop_path(self.ffn(self.ln_wo_grad(x) * (s2 + 1) + b2) * g2)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C, D):
        super().__init__()
        self.C, self.D = C, D
        self.ln_wo_grad = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * C))

    def forward(self, x_BLC, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC) * (scale + 1) + shift


# ------------------------------------------------------------------------------------------
# tokenizer: residual multi-scale VQ with partially shared Phi convolutions
# ------------------------------------------------------------------------------------------
class Phi(nn.Conv2d):
    def __init__(self, dim, ratio):
        super().__init__(dim, dim, kernel_size=3, padding=1)
        self.resi_ratio = abs(ratio)

    def forward(self, h):
        return h * (1 - self.resi_ratio) + super().forward(h) * self.resi_ratio


class PhiPartiallyShared(nn.Module):
    """quant_resi[t] for t in [0, 1] picks the Phi whose tick is nearest to t."""
    def __init__(self, phis: nn.ModuleList):
        super().__init__()
        self.qresi_ls = phis
        k = len(phis)
        edge = 1 / 3 / k if k == 4 else 1 / 2 / k
        self.ticks = torch.linspace(edge, 1 - edge, k)

    def __getitem__(self, at: float) -> Phi:
        return self.qresi_ls[int((self.ticks - at).abs().argmin())]


class VectorQuantizer2(nn.Module):
    def __init__(self, vocab_size, Cvae, using_znorm, v_patch_nums, quant_resi=0.5, share_quant_resi=4):
        super().__init__()
        self.vocab_size, self.Cvae, self.using_znorm = vocab_size, Cvae, using_znorm
        self.v_patch_nums = tuple(v_patch_nums)
        self.quant_resi = PhiPartiallyShared(nn.ModuleList(Phi(Cvae, quant_resi) for _ in range(share_quant_resi)))
        self.embedding = nn.Embedding(vocab_size, Cvae)
        self.prog_si = -1

    def _nearest(self, z_NC):
        book = self.embedding.weight.data
        if self.using_znorm:
            return (F.normalize(z_NC, dim=-1) @ F.normalize(book.T, dim=0)).argmax(dim=1)
        dist = z_NC.square().sum(1, keepdim=True) + book.square().sum(1) - 2 * z_NC @ book.T
        return dist.argmin(dim=1)

    def f_to_idxBl_or_fhat(self, f_BChw, to_fhat, v_patch_nums=None):
        B, C, H, W = f_BChw.shape
        rest = f_BChw.detach().clone()
        f_hat = torch.zeros_like(rest)
        sides = [(p, p) if isinstance(p, int) else tuple(p) for p in (v_patch_nums or self.v_patch_nums)]
        n, out = len(sides), []
        for si, (ph, pw) in enumerate(sides):
            small = rest if si == n - 1 else F.interpolate(rest, size=(ph, pw), mode="area")
            idx = self._nearest(small.permute(0, 2, 3, 1).reshape(-1, C))
            h = self.embedding(idx.view(B, ph, pw)).permute(0, 3, 1, 2)
            if si != n - 1:
                h = F.interpolate(h, size=(H, W), mode="bicubic")
            h = self.quant_resi[si / (n - 1)](h.contiguous())
            f_hat.add_(h)
            rest.sub_(h)
            out.append(f_hat.clone() if to_fhat else idx.reshape(B, ph * pw))
        return out

    def idxBl_to_var_input(self, gt_ms_idx_Bl):
        B, C = gt_ms_idx_Bl[0].shape[0], self.Cvae
        full, n = self.v_patch_nums[-1], len(self.v_patch_nums)
        f_hat = torch.zeros(B, C, full, full, device=gt_ms_idx_Bl[0].device)
        pieces = []
        for si in range(n - 1):
            side = self.v_patch_nums[si]
            h = self.embedding(gt_ms_idx_Bl[si]).transpose(1, 2).reshape(B, C, side, side)
            f_hat.add_(self.quant_resi[si / (n - 1)](F.interpolate(h, size=(full, full), mode="bicubic")))
            nxt = self.v_patch_nums[si + 1]
            pieces.append(F.interpolate(f_hat, size=(nxt, nxt), mode="area").view(B, C, -1).transpose(1, 2))
        return torch.cat(pieces, dim=1) if pieces else None

    def get_next_autoregressive_input(self, si, SN, f_hat, h_BChw):
        full = self.v_patch_nums[-1]
        if si == SN - 1:
            f_hat.add_(self.quant_resi[si / (SN - 1)](h_BChw))
            return f_hat, f_hat
        f_hat.add_(self.quant_resi[si / (SN - 1)](F.interpolate(h_BChw, size=(full, full), mode="bicubic")))
        nxt = self.v_patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(nxt, nxt), mode="area")


class VQVAE(nn.Module):
    """Only what the AR side touches: an encoder to the latent grid and the quantiser."""
    def __init__(self, vocab_size=64, z_channels=8, v_patch_nums=(1, 2, 3), using_znorm=False, downsample=4):
        super().__init__()
        self.V = self.vocab_size = vocab_size
        self.Cvae = z_channels
        self.encoder = nn.Conv2d(3, z_channels, kernel_size=downsample, stride=downsample)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, 3, padding=1)
        self.quantize = VectorQuantizer2(vocab_size, z_channels, using_znorm, v_patch_nums)
        self.eval()  # VAR builds its VQVAE frozen (test_mode=True)
        self.requires_grad_(False)

    def img_to_idxBl(self, inp, v_patch_nums=None):
        return self.quantize.f_to_idxBl_or_fhat(self.quant_conv(self.encoder(inp)), to_fhat=False,
                                                v_patch_nums=v_patch_nums)


# ------------------------------------------------------------------------------------------
# the transformer
# ------------------------------------------------------------------------------------------
class VAR(nn.Module):
    def __init__(self, vae_local: VQVAE, num_classes=10, depth=2, embed_dim=64, num_heads=2,
                 cond_drop_rate=0.1, attn_l2_norm=True, patch_nums=(1, 2, 3), attn_drop_rate=0.0):
        super().__init__()
        self.Cvae, self.V = vae_local.Cvae, vae_local.vocab_size
        self.depth, self.C, self.D, self.num_heads = depth, embed_dim, embed_dim, num_heads
        self.cond_drop_rate, self.prog_si = cond_drop_rate, -1
        self.patch_nums = tuple(patch_nums)
        self.L = sum(p * p for p in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        starts = [0]
        for p in self.patch_nums:
            starts.append(starts[-1] + p * p)
        self.begin_ends = list(zip(starts[:-1], starts[1:]))
        self.num_stages_minus_1 = len(self.patch_nums) - 1
        self.vae_proxy, self.vae_quant_proxy = (vae_local,), (vae_local.quantize,)
        self.word_embed = nn.Linear(self.Cvae, self.C)
        self.num_classes = num_classes
        std = math.sqrt(1 / self.C / 3)
        self.class_emb = nn.Embedding(num_classes + 1, self.C)
        self.pos_start = nn.Parameter(torch.randn(1, self.first_l, self.C) * std)
        self.pos_1LC = nn.Parameter(torch.randn(1, self.L, self.C) * std)
        self.lvl_embed = nn.Embedding(len(self.patch_nums), self.C)
        self.shared_ada_lin = nn.Identity()
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(i, self.C, self.D, num_heads, attn_drop=attn_drop_rate, attn_l2_norm=attn_l2_norm)
            for i in range(depth))
        level = torch.cat([torch.full((p * p,), i) for i, p in enumerate(self.patch_nums)])
        self.register_buffer("lvl_1L", level[None].contiguous())
        self.register_buffer("attn_bias_for_masking", block_causal_bias(self.patch_nums))
        self.head_nm = AdaLNBeforeHead(self.C, self.D)
        self.head = nn.Linear(self.C, self.V)

    def get_logits(self, h, cond_BD):
        return self.head(self.head_nm(h.float(), cond_BD).float()).float()

    def forward(self, label_B, x_BLCv_wo_first_l):
        ed = self.begin_ends[self.prog_si][1] if self.prog_si >= 0 else self.L
        B = x_BLCv_wo_first_l.shape[0]
        drop = torch.rand(B, device=label_B.device) < self.cond_drop_rate
        cond_BD = self.class_emb(torch.where(drop, self.num_classes, label_B))
        sos = cond_BD[:, None].expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1)
        x = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
        x = x + self.lvl_embed(self.lvl_1L[:, :ed].expand(B, -1)) + self.pos_1LC[:, :ed]
        attn_bias = self.attn_bias_for_masking[:, :, :ed, :ed]
        cond = self.shared_ada_lin(cond_BD)
        for b in self.blocks:
            x = b(x=x, cond_BD=cond, attn_bias=attn_bias)
        return self.get_logits(x.float(), cond_BD)

    @torch.no_grad()
    def autoregressive_infer_cfg(self, B, label_B, cfg=1.5):
        """Greedy (argmax) sampling with CFG through the KV cache; returns the codes per scale
        and f_hat (the stand-in has no decoder)."""
        cond_BD = self.class_emb(torch.cat((label_B, torch.full_like(label_B, self.num_classes))))
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC
        x = cond_BD[:, None].expand(2 * B, self.first_l, -1) + self.pos_start.expand(2 * B, -1, -1) \
            + lvl_pos[:, :self.first_l]
        quant = self.vae_quant_proxy[0]
        f_hat = cond_BD.new_zeros(B, self.Cvae, self.patch_nums[-1], self.patch_nums[-1])
        codes, cur = [], 0
        for b in self.blocks:
            b.attn.kv_caching(True)
        for si, pn in enumerate(self.patch_nums):
            cur += pn * pn
            h = x
            for b in self.blocks:
                h = b(x=h, cond_BD=cond_BD, attn_bias=None)
            logits = self.get_logits(h, cond_BD)
            t = cfg * si / max(self.num_stages_minus_1, 1)
            idx = ((1 + t) * logits[:B] - t * logits[B:]).argmax(-1)
            codes.append(idx)
            emb = quant.embedding(idx).transpose(1, 2).reshape(B, self.Cvae, pn, pn)
            f_hat, nxt = quant.get_next_autoregressive_input(si, len(self.patch_nums), f_hat, emb)
            if si != self.num_stages_minus_1:
                x = self.word_embed(nxt.view(B, self.Cvae, -1).transpose(1, 2)) \
                    + lvl_pos[:, cur:cur + self.patch_nums[si + 1] ** 2]
                x = x.repeat(2, 1, 1)
        for b in self.blocks:
            b.attn.kv_caching(False)
        return codes, f_hat
