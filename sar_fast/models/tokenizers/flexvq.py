"""FlexVAR's tokenizer: LlamaGen's VQ-16 (checkpoint `FlexVAE.pth`, weights under 'model').

Multi-scale tokenisation is NON-residual (FlexVAR's `encode_var_wo_firstL`): the continuous
latent (encoder -> 1x1 quant_conv) is area-downsampled to every side s of the schedule and
each map is quantised on its own: latent vectors and codebook rows are L2-normalised and
the nearest row by squared L2 distance wins. The teacher-forcing input of scale i+1 is the
quantised map of scale i bicubic-upsampled to s_{i+1}. Decoding uses the last scale only:
its (normalised) embedding map -> 1x1 post_quant_conv -> decoder.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import ops
from .base import Codes, MultiScaleTokenizer, _count_indexed, _require
from .layers import Downsample2x, ResBlock, SelfAttention2d, Upsample2x, conv3x3, group_norm, swish

# LlamaGen keeps a ring buffer of recently used code ids (training statistics only).
_USAGE_BUFFER_LEN = 65536


# Encoder and decoder repeat varvq.py's in shape, and each forward mirrors the other's stage
# loop, on purpose: the attribute names are the checkpoint keys (LlamaGen's here, VAR's there),
# and a literal layout per format keeps key-for-key loading checkable by reading.
class _Encoder(nn.Module):
    """LlamaGen layout: conv_blocks[level].res / .attn / .downsample, mid = [res, attn, res]."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, groups: int):
        super().__init__()
        self.conv_in = conv3x3(3, ch)
        self.conv_blocks = nn.ModuleList()
        c_in = ch
        for level, mult in enumerate(ch_mult):
            last = level == len(ch_mult) - 1
            block = nn.Module()
            block.res = nn.ModuleList()
            block.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                block.res.append(ResBlock(c_in, ch * mult, groups, swish))
                c_in = ch * mult
                if last:  # attention only at the coarsest level
                    block.attn.append(SelfAttention2d(c_in, groups, fused_qkv=False))
            if not last:
                block.downsample = Downsample2x(c_in)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList([ResBlock(c_in, c_in, groups, swish), SelfAttention2d(c_in, groups, fused_qkv=False),
                                  ResBlock(c_in, c_in, groups, swish)])
        self.norm_out = group_norm(c_in, groups)
        self.conv_out = conv3x3(c_in, z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        # deliberate repeat: the decoder below walks the same way; encoder and decoder differ in direction and in the
        # module they end a level with
        for block in self.conv_blocks:
            for i, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[i](h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for layer in self.mid:
            h = layer(h)
        return self.conv_out(swish(self.norm_out(h)))


class _Decoder(nn.Module):
    """LlamaGen layout: conv_blocks run coarsest level first (conv_blocks[0] = last ch_mult
    entry, with attention), each with num_res_blocks + 1 res blocks, then .upsample."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, groups: int):
        super().__init__()
        c_in = ch * ch_mult[-1]
        self.conv_in = conv3x3(z_channels, c_in)
        self.mid = nn.ModuleList([ResBlock(c_in, c_in, groups, swish), SelfAttention2d(c_in, groups, fused_qkv=False),
                                  ResBlock(c_in, c_in, groups, swish)])
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            block = nn.Module()
            block.res = nn.ModuleList()
            block.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                block.res.append(ResBlock(c_in, ch * ch_mult[level], groups, swish))
                c_in = ch * ch_mult[level]
                if level == len(ch_mult) - 1:
                    block.attn.append(SelfAttention2d(c_in, groups, fused_qkv=False))
            if level != 0:
                block.upsample = Upsample2x(c_in)
            self.conv_blocks.append(block)
        self.norm_out = group_norm(c_in, groups)
        self.conv_out = conv3x3(c_in, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for layer in self.mid:
            h = layer(h)
        for block in self.conv_blocks:
            for i, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[i](h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class _Quantizer(nn.Module):
    """Holds the codebook (`embedding`, stored un-normalised) and LlamaGen's usage buffer."""

    def __init__(self, vocab_size: int, Cvae: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, Cvae)
        with torch.no_grad():  # LlamaGen's init: small uniform, then unit rows
            self.embedding.weight.uniform_(-1.0 / vocab_size, 1.0 / vocab_size)
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        self.register_buffer("codebook_used", torch.zeros(_USAGE_BUFFER_LEN))


class FlexVQ16(MultiScaleTokenizer):
    """LlamaGen VQ-16 as FlexVAR uses it. Defaults are the released `FlexVAE.pth` config
    (vocab 8912, code dim 32, z 256, ch 128, ch_mult 1,1,2,2,4): state-dict keys equal the
    original's, so `load_state_dict(torch.load('FlexVAE.pth')['model'])` works.

    encode: images [B, 3, H, W] in [-1, 1] -> codes per scale. decode: codes -> images in
    [0, 1] (only the last scale's codes matter). The codebook is L2-normalised.
    """

    mode = "flexvar"
    normalize_codes = True

    def __init__(self, vocab_size: int = 8912, Cvae: int = 32, z_channels: int = 256, ch: int = 128,
                 ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2, norm_groups: int = 32):
        super().__init__()
        for name, v in (("vocab_size", vocab_size), ("Cvae", Cvae), ("z_channels", z_channels), ("ch", ch),
                        ("num_res_blocks", num_res_blocks), ("norm_groups", norm_groups)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        ch_mult = tuple(ch_mult)
        if not ch_mult or any(not isinstance(m, int) or m < 1 for m in ch_mult):
            raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {ch_mult!r}")
        self.vocab_size, self.Cvae = vocab_size, Cvae
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.encoder = _Encoder(ch, ch_mult, num_res_blocks, z_channels, norm_groups)
        self.decoder = _Decoder(ch, ch_mult, num_res_blocks, z_channels, norm_groups)
        self.quantize = _Quantizer(vocab_size, Cvae)
        self.quant_conv = nn.Conv2d(z_channels, Cvae, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(Cvae, z_channels, kernel_size=1)

    def codebook(self) -> torch.Tensor:
        """The L2-normalised codebook [V, Cvae]: what codes embed to."""
        return F.normalize(self.quantize.embedding.weight, p=2, dim=-1)

    def codes_to_latent(self, codes: Codes, schedule: Sequence[int] | None = None) -> torch.Tensor:
        """The decoder's input [B, Cvae, s, s]: the last scale's normalised embedding map.
        `codes`: a per-scale list, [B, L] with `schedule`, or the last scale alone [B, s*s]."""
        if isinstance(codes, torch.Tensor) and schedule is None and codes.dim() == 2:
            side = round(codes.shape[1] ** 0.5)
            if side * side != codes.shape[1]:
                raise ValueError(f"codes [B, s*s] without a schedule must be one square scale, "
                                 f"got {codes.shape[1]} tokens")
            schedule = (side,)
        flat, schedule = self._flat_codes(codes, schedule)
        last = schedule[-1]
        return ops.msq_decode(flat[:, -last * last:], self.quantize.embedding.weight, (last,),
                              mode="flexvar", normalize=True)

    @torch.no_grad()
    def decode(self, codes: Codes, schedule: Sequence[int] | None = None) -> torch.Tensor:
        """Images [B, 3, 16s, 16s] in [0, 1] from the last scale's codes [B, s*s] (or a
        per-scale list / [B, L] with `schedule`, whose last scale is used)."""
        return self.decode_latent(self.codes_to_latent(codes, schedule))

    def _scale_shift(self, flat: torch.Tensor, schedule: tuple[int, ...]) -> torch.Tensor:
        return ops.scale_shift(flat, self.codebook(), schedule, mode="flexvar", check_range=False)

    @classmethod
    def infer_config(cls, sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        _require(sd, ("quantize.embedding.weight", "quant_conv.weight", "encoder.conv_in.weight",
                      "encoder.conv_blocks.0.res.0.conv1.weight"), "LlamaGen VQ (FlexVAE)")
        vocab_size, Cvae = sd["quantize.embedding.weight"].shape
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = _count_indexed(sd, "encoder.conv_blocks.")
        ch_mult = tuple(sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(levels))
        return dict(vocab_size=vocab_size, Cvae=Cvae, z_channels=sd["quant_conv.weight"].shape[1], ch=ch,
                    ch_mult=ch_mult, num_res_blocks=_count_indexed(sd, "encoder.conv_blocks.0.res."))
