"""Stand-ins for FlexVAR's / SAR's `FlexVAR` (SAR's `student_forcing` flag included), the
LlamaGen VQ-16 `VQModel` / `VectorQuantizer` and the trainer's `encode_var_wo_firstL`
(names, attributes and numerics as in jiaosiyu1999/FlexVAR and GengzeZhou/SAR; the code is
this project's own). The blocks are VAR's (the originals share them)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .var_like import AdaLNBeforeHead, AdaLNSelfAttn, block_causal_bias


class VectorQuantizer(nn.Module):
    def __init__(self, n_e, e_dim, beta=0.25, entropy_loss_ratio=0.0, l2_norm=True, show_usage=True):
        super().__init__()
        self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
        self.entropy_loss_ratio, self.l2_norm, self.show_usage = entropy_loss_ratio, l2_norm, show_usage
        self.embedding = nn.Embedding(n_e, e_dim)
        if show_usage:
            self.register_buffer("codebook_used", torch.zeros(4096))

    def forward(self, z):
        z = z.permute(0, 2, 3, 1).contiguous()
        flat = z.view(-1, self.e_dim)
        book = self.embedding.weight
        if self.l2_norm:
            z, flat, book = F.normalize(z, dim=-1), F.normalize(flat, dim=-1), F.normalize(book, dim=-1)
        dist = flat.square().sum(1, keepdim=True) + book.square().sum(1) - 2 * flat @ book.T
        idx = dist.argmin(dim=1)
        z_q = book[idx].view(z.shape)
        if self.show_usage and self.training:  # a rolling window of the codes seen
            n = idx.shape[0]
            self.codebook_used[:-n] = self.codebook_used[n:].clone()
            self.codebook_used[-n:] = idx.float()
        z_q = z + (z_q - z).detach()  # straight-through
        return z_q.permute(0, 3, 1, 2), (None, None, None, 0), (None, None, idx)


class VQModel(nn.Module):
    def __init__(self, codebook_size=64, codebook_embed_dim=8, downsample=4, z_channels=16):
        super().__init__()
        self.Cvae, self.vocab_size = codebook_embed_dim, codebook_size
        self.encoder = nn.Conv2d(3, z_channels, kernel_size=downsample, stride=downsample)
        self.quantize = VectorQuantizer(codebook_size, codebook_embed_dim)
        self.quant_conv = nn.Conv2d(z_channels, codebook_embed_dim, 1)
        self.eval()  # FlexVAR / SAR freeze the VQ-16 tokenizer
        self.requires_grad_(False)

    def encode_conti(self, x):
        return self.quant_conv(self.encoder(x))


class VARTrainer:
    """The one trainer method the patch swaps: the teacher-forcing input and the codes."""
    def __init__(self, vae_local: VQModel):
        self.vae_local = vae_local

    def encode_var_wo_firstL(self, x, curr_patch_nums):
        h = self.vae_local.encode_conti(x)
        inputs, codes = [], []
        for i, side in enumerate(curr_patch_nums):
            quant, _, info = self.vae_local.quantize(F.interpolate(h.clone(), size=(side, side), mode="area"))
            codes.append(info[-1].view(quant.shape[0], -1))
            if i != len(curr_patch_nums) - 1:
                nxt = curr_patch_nums[i + 1]
                up = F.interpolate(quant, size=(nxt, nxt), mode="bicubic")
                inputs.append(up.reshape(quant.shape[0], quant.shape[1], -1))
        return torch.cat(inputs, dim=2).permute(0, 2, 1), torch.cat(codes, dim=1)


class FlexVAR(nn.Module):
    def __init__(self, vae_local: VQModel, num_classes=10, depth=2, embed_dim=64, num_heads=2,
                 cond_drop_rate=0.1, attn_l2_norm=True, patch_nums=(1, 2, 3, 4), pos_grid=8):
        super().__init__()
        self.Cvae, self.V = vae_local.Cvae, vae_local.vocab_size
        self.depth, self.C, self.D, self.num_heads = depth, embed_dim, embed_dim, num_heads
        self.cond_drop_rate, self.prog_si = cond_drop_rate, -1
        self.num_classes = num_classes
        self.word_embed = nn.Linear(self.Cvae, self.C)
        std = math.sqrt(1 / self.C / 3)
        self.class_emb = nn.Embedding(num_classes + 1, self.C)
        self.pos_start = nn.Parameter(torch.randn(1, 1, self.C) * std)
        self.pos_1LC = nn.Parameter(torch.randn(1, self.C, pos_grid, pos_grid) * std)  # 2D, area-resized per scale
        self.shared_ada_lin = nn.Identity()
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(i, self.C, self.D, num_heads, attn_l2_norm=attn_l2_norm) for i in range(depth))
        self.register_buffer("attn_bias_for_masking", torch.zeros(1, 1, 1, 1))
        self.update_patch_related(tuple(patch_nums))
        self.head_nm = AdaLNBeforeHead(self.C, self.D)
        self.head = nn.Linear(self.C, self.V)

    def get_logits(self, h, cond_BD):
        return self.head(self.head_nm(h, cond_BD))

    def update_patch_related(self, infer_patch_nums):
        self.patch_nums = infer_patch_nums
        self.L = sum(p * p for p in infer_patch_nums)
        self.first_l = infer_patch_nums[0] ** 2
        starts = [0]
        for p in infer_patch_nums:
            starts.append(starts[-1] + p * p)
        self.begin_ends = list(zip(starts[:-1], starts[1:]))
        self.num_stages_minus_1 = len(infer_patch_nums) - 1
        self.attn_bias_for_masking = block_causal_bias(infer_patch_nums).to(self.attn_bias_for_masking.device)

    def _pos(self, sides):
        return torch.cat([F.interpolate(self.pos_1LC, size=(s, s), mode="area").flatten(2).transpose(1, 2)
                          for s in sides], dim=1)

    def forward(self, label_B, x_BLCv_wo_first_l, infer_patch_nums, student_forcing=False):
        self.update_patch_related(infer_patch_nums)
        B = x_BLCv_wo_first_l.shape[0]
        drop = torch.rand(B, device=label_B.device) < self.cond_drop_rate
        cond_BD = self.class_emb(torch.where(drop, self.num_classes, label_B))
        words = self.word_embed(x_BLCv_wo_first_l.to(cond_BD.dtype))
        if student_forcing:  # SAR: [class token] + one scale's inputs, layout [1, n]
            x = torch.cat((cond_BD[:, None], words), dim=1)
        else:
            sos = cond_BD[:, None].expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
            x = torch.cat((sos, words), dim=1)
        x = x + self._pos(self.patch_nums)[:, :self.L]
        attn_bias = self.attn_bias_for_masking
        for b in self.blocks:
            x = b(x=x, cond_BD=cond_BD, attn_bias=attn_bias)
        return self.get_logits(x[:, 1:] if student_forcing else x, cond_BD)

    @torch.no_grad()
    def autoregressive_infer_cfg(self, vqvae, B, label_B, infer_patch_nums, cfg=1.5):
        """Greedy (argmax) sampling with CFG through the KV cache; returns the codes per scale."""
        cond_BD = self.class_emb(torch.cat((label_B, torch.full_like(label_B, self.num_classes))))
        pos = self._pos(infer_patch_nums)
        x = cond_BD[:, None].expand(2 * B, self.first_l, -1) + self.pos_start.expand(2 * B, -1, -1) + pos[:, :1]
        book = F.normalize(vqvae.quantize.embedding.weight, dim=-1)
        codes, cur = [], 0
        for b in self.blocks:
            b.attn.kv_caching(True)
        for si, pn in enumerate(infer_patch_nums):
            cur += pn * pn
            h = x
            for b in self.blocks:
                h = b(x=h, cond_BD=cond_BD, attn_bias=None)
            logits = self.get_logits(h, cond_BD)
            t = cfg * si / max(len(infer_patch_nums) - 1, 1)
            idx = ((1 + t) * logits[:B] - t * logits[B:]).argmax(-1)
            codes.append(idx)
            if si != len(infer_patch_nums) - 1:
                nxt = infer_patch_nums[si + 1]
                q = book[idx].reshape(B, pn, pn, -1).permute(0, 3, 1, 2)
                up = F.interpolate(q, size=(nxt, nxt), mode="bicubic").flatten(2).transpose(1, 2)
                x = (self.word_embed(up) + pos[:, cur:cur + nxt * nxt]).repeat(2, 1, 1)
        for b in self.blocks:
            b.attn.kv_caching(False)
        return codes
