"""VAR's tokenizer: the multi-scale residual VQVAE (checkpoint `vae_ch160v4096z32.pth`, a
flat state dict).

Tokenisation is residual (VAR's `f_to_idxBl_or_fhat`): with f = quant_conv(encoder(x)),
f_rest = f and f_hat = 0, for every scale i of side s_i: area-downsample f_rest to s_i
(the last scale uses f_rest as is), pick the nearest codebook row by squared L2 (no
normalisation), embed, bicubic-upsample to the latent side (not at the last scale), pass
through Phi_i, then f_hat += h and f_rest -= h. Phi_i is one of `share_quant_resi` 3x3
convs mixed with the identity: Phi(h) = (1 - r) h + r conv(h), r = 0.5; the conv used for
scale i is the one whose tick (linspace over [1/(3K), 1 - 1/(3K)] for K = 4, else
[1/(2K), 1 - 1/(2K)]) is nearest to i / (n - 1). Decoding rebuilds f_hat from all scales;
the teacher-forcing input of scale i+1 is f_hat after scale i, area-downsampled to s_{i+1}.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import ops
from ..checkpoint import CheckpointError
from .base import Codes, MultiScaleTokenizer, _count_indexed, _require
from .layers import Downsample2x, ResBlock, SelfAttention2d, Upsample2x, conv3x3, group_norm


def _mid(c: int, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResBlock(c, c, groups, F.silu)
    mid.attn_1 = SelfAttention2d(c, groups, fused_qkv=True)
    mid.block_2 = ResBlock(c, c, groups, F.silu)
    return mid


# Encoder and decoder repeat flexvq.py's in shape, and each forward mirrors the other's stage
# loop, on purpose: the attribute names are the checkpoint keys (VAR's here, LlamaGen's there),
# and a literal layout per format keeps key-for-key loading checkable by reading.
# deliberate repeat: the same walk as flexvq._Encoder over VAR's module names; the names are the checkpoint keys, so the
# two layouts stay apart
class _Encoder(nn.Module):
    """VAR layout: down[level].block / .attn / .downsample, mid.block_1 / attn_1 / block_2."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, groups: int):
        super().__init__()
        self.conv_in = conv3x3(3, ch)
        self.down = nn.ModuleList()
        c_in = ch
        for level, mult in enumerate(ch_mult):
            last = level == len(ch_mult) - 1
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResBlock(c_in, ch * mult, groups, F.silu))
                c_in = ch * mult
                if last:  # attention only at the coarsest level
                    stage.attn.append(SelfAttention2d(c_in, groups, fused_qkv=True))
            if not last:
                stage.downsample = Downsample2x(c_in)
            self.down.append(stage)
        self.mid = _mid(c_in, groups)
        self.norm_out = group_norm(c_in, groups)
        self.conv_out = conv3x3(c_in, z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        # deliberate repeat: the decoder below walks the same way; encoder and decoder differ in direction and in the
        # module they end a level with
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class _Decoder(nn.Module):
    """VAR layout: up[level] indexed by level (run from the coarsest, up[-1], down to up[0]),
    num_res_blocks + 1 blocks each, attention at the coarsest level, then .upsample."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, groups: int):
        super().__init__()
        c_in = ch * ch_mult[-1]
        self.conv_in = conv3x3(z_channels, c_in)
        self.mid = _mid(c_in, groups)
        stages = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResBlock(c_in, ch * ch_mult[level], groups, F.silu))
                c_in = ch * ch_mult[level]
                if level == len(ch_mult) - 1:
                    stage.attn.append(SelfAttention2d(c_in, groups, fused_qkv=True))
            if level != 0:
                stage.upsample = Upsample2x(c_in)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = group_norm(c_in, groups)
        self.conv_out = conv3x3(c_in, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class PhiConv(nn.Conv2d):
    """(1 - r) h + r conv3x3(h): VAR's quant_resi refinement of an upsampled embedding."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, kernel_size=3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.ratio) + super().forward(h).mul(self.ratio)


class _PhiSet(nn.Module):
    """K Phi layers shared across scales. K >= 2 keeps VAR's `qresi_ls.{k}` keys (partially
    shared); K = 1 keeps its `qresi` key (fully shared)."""

    def __init__(self, channels: int, ratio: float, count: int):
        super().__init__()
        make = (lambda: PhiConv(channels, ratio)) if abs(ratio) > 1e-6 else nn.Identity
        if count == 1:
            self.qresi = make()
        else:
            self.qresi_ls = nn.ModuleList([make() for _ in range(count)])
            # VAR's tick positions, computed exactly as it does (numpy, float64) so that
            # i / (n - 1) falling halfway between two ticks resolves the same way.
            margin = 1 / 3 / count if count == 4 else 1 / 2 / count
            self.ticks = np.linspace(margin, 1 - margin, count)

    def index_for(self, scale_index: int, num_scales: int) -> int:
        """Which Phi scale `scale_index` of `num_scales` uses (nearest tick, first on ties).
        A single-scale schedule (undefined in VAR, which divides by n - 1) uses position 1."""
        if hasattr(self, "qresi"):
            return 0
        at = scale_index / (num_scales - 1) if num_scales > 1 else 1.0
        return int(np.argmin(np.abs(self.ticks - at)))

    def layer(self, scale_index: int, num_scales: int) -> nn.Module:
        if hasattr(self, "qresi"):
            return self.qresi
        return self.qresi_ls[self.index_for(scale_index, num_scales)]


class _Quantizer(nn.Module):
    """Raw codebook `embedding`, the Phi set `quant_resi`, and VAR's per-scale usage
    statistics `ema_vocab_hit_SV` [num_scales, V] (training only; kept for round trips)."""

    def __init__(self, vocab_size: int, Cvae: int, quant_resi: float, share_quant_resi: int, usage_scales: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, Cvae)
        self.quant_resi = _PhiSet(Cvae, quant_resi, share_quant_resi)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(usage_scales, vocab_size))

    def apply_phi(self, h: torch.Tensor, scale_index: int, num_scales: int) -> torch.Tensor:
        layer = self.quant_resi.layer(scale_index, num_scales)
        dtype = self.embedding.weight.dtype
        return layer(h.to(dtype)).to(h.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The usage buffer's first dim is the schedule length VAR was built with; take the
        # checkpoint's shape (as VAR's own load_state_dict tolerates a mismatch).
        got = state_dict.get(prefix + "ema_vocab_hit_SV")
        if got is not None and got.dim() == 2 and got.shape != self.ema_vocab_hit_SV.shape:
            self.ema_vocab_hit_SV = self.ema_vocab_hit_SV.new_zeros(got.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class VARVQVAE(MultiScaleTokenizer):
    """VAR's multi-scale residual VQVAE. Defaults are the released `vae_ch160v4096z32.pth`
    (vocab 4096, code dim 32, ch 160, 4 shared Phi convs, ratio 0.5); state-dict keys equal
    the original's, so `load_state_dict(torch.load('vae_ch160v4096z32.pth'))` works.

    encode: images [B, 3, H, W] in [-1, 1] -> codes per scale. decode: codes of every scale
    -> images in [0, 1]. The codebook is used raw (no normalisation).
    """

    mode = "var"
    normalize_codes = False
    _resizable_keys = ("quantize.ema_vocab_hit_SV",)

    def __init__(self, vocab_size: int = 4096, Cvae: int = 32, ch: int = 160,
                 ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2, norm_groups: int = 32,
                 share_quant_resi: int = 4, quant_resi: float = 0.5, quant_conv_ks: int = 3,
                 usage_scales: int = 10):
        super().__init__()
        for name, v in (("vocab_size", vocab_size), ("Cvae", Cvae), ("ch", ch), ("num_res_blocks", num_res_blocks),
                        ("norm_groups", norm_groups), ("usage_scales", usage_scales)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(share_quant_resi, int) or share_quant_resi < 1:
            raise ValueError(f"share_quant_resi must be >= 1 (VAR's released VQVAE uses 4; one Phi per scale, "
                             f"share_quant_resi=0, is not supported), got {share_quant_resi!r}")
        if not isinstance(quant_conv_ks, int) or quant_conv_ks < 1 or quant_conv_ks % 2 == 0:
            raise ValueError(f"quant_conv_ks must be a positive odd int, got {quant_conv_ks!r}")
        ch_mult = tuple(ch_mult)
        if not ch_mult or any(not isinstance(m, int) or m < 1 for m in ch_mult):
            raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {ch_mult!r}")
        self.vocab_size, self.Cvae = vocab_size, Cvae
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.encoder = _Encoder(ch, ch_mult, num_res_blocks, Cvae, norm_groups)
        self.decoder = _Decoder(ch, ch_mult, num_res_blocks, Cvae, norm_groups)
        self.quantize = _Quantizer(vocab_size, Cvae, quant_resi, share_quant_resi, usage_scales)
        self.quant_conv = nn.Conv2d(Cvae, Cvae, quant_conv_ks, padding=quant_conv_ks // 2)
        self.post_quant_conv = nn.Conv2d(Cvae, Cvae, quant_conv_ks, padding=quant_conv_ks // 2)

    def codebook(self) -> torch.Tensor:
        """The raw codebook [V, Cvae] (VAR does not normalise)."""
        return self.quantize.embedding.weight

    @property
    def phi(self):
        return self.quantize.apply_phi

    def codes_to_latent(self, codes: Codes, schedule: Sequence[int] | None = None) -> torch.Tensor:
        """f_hat [B, Cvae, s, s], s = last side: the sum over scales of Phi(bicubic-upsampled
        embedding). `codes`: the per-scale list, or [B, L] with `schedule`."""
        flat, schedule = self._flat_codes(codes, schedule)
        return ops.msq_decode(flat, self.codebook(), schedule, mode="var", normalize=False, phi=self.phi)

    @torch.no_grad()
    def decode(self, codes: Codes, schedule: Sequence[int] | None = None) -> torch.Tensor:
        """Images [B, 3, 16s, 16s] in [0, 1] from the codes of every scale (VAR's
        idxBl_to_img(..., same_shape=True, last_one=True), then (x + 1) / 2)."""
        return self.decode_latent(self.codes_to_latent(codes, schedule))

    def _scale_shift(self, flat: torch.Tensor, schedule: tuple[int, ...]) -> torch.Tensor:
        return ops.scale_shift(flat, self.codebook(), schedule, mode="var", phi=self.phi, check_range=False)

    @classmethod
    def infer_config(cls, sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        _require(sd, ("quantize.embedding.weight", "quant_conv.weight", "encoder.conv_in.weight",
                      "encoder.down.0.block.0.conv1.weight"), "VAR VQVAE")
        vocab_size, Cvae = sd["quantize.embedding.weight"].shape
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = _count_indexed(sd, "encoder.down.")
        cfg: dict[str, Any] = dict(
            vocab_size=vocab_size, Cvae=Cvae, ch=ch,
            ch_mult=tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)),
            num_res_blocks=_count_indexed(sd, "encoder.down.0.block."),
            quant_conv_ks=sd["quant_conv.weight"].shape[-1])
        shared = _count_indexed(sd, "quantize.quant_resi.qresi_ls.")
        if shared:
            cfg["share_quant_resi"] = shared
        elif "quantize.quant_resi.qresi.weight" in sd:
            cfg["share_quant_resi"] = 1
        elif any(k.startswith("quantize.quant_resi.") for k in sd):
            raise CheckpointError("unsupported quant_resi layout (one Phi per scale?): "
                                  f"{sorted(k for k in sd if k.startswith('quantize.quant_resi.'))[:4]}")
        else:
            cfg["quant_resi"] = 0.0  # Phi = identity: VAR stores no weights for it
        if "quantize.ema_vocab_hit_SV" in sd:
            cfg["usage_scales"] = sd["quantize.ema_vocab_hit_SV"].shape[0]
        return cfg
