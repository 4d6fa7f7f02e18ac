"""The weight-free grey-level tokenizer of the embedded default: its latent is the grey image
itself (code dim 1) and its codebook `levels` evenly spaced grey values, so the codes of
every scale are the area-downsampled image rounded to the nearest level. It follows the
interface of the real tokenizers: `encode(images in [-1, 1], schedule) -> list of [B, s*s]`,
`decode(codes) -> [B, 3, H, W] in [0, 1]`, `codebook()`, `tf_inputs`, `Cvae`, `vocab_size`,
`downsample`, `mode`."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ... import ops
from ...schedules import Schedule
from .base import Codes, flatten_codes

EMBEDDED = "embedded-digits"  # what --data / --vae take to mean the embedded dataset / this tokenizer
DIGITS_MAX_GREY = 16  # the embedded digits' grey levels are the integers 0..16


class GreyLevelTokenizer(nn.Module):
    """A weight-free multi-scale tokenizer: latent = grey image in [0, 1] ([B, 1, H, W]),
    codebook = `levels` grey values linspace(0, 1, levels) ([levels, 1]), FlexVAR-style
    independent scales (area-downsample, nearest grey level; no normalisation).

    With the default 17 levels the digits' grey values 0..16 are represented exactly, so
    decode(encode(x)) == x at the last scale.
    """

    mode = "flexvar"
    normalize_codes = False
    Cvae = 1
    downsample = 1
    phi = None  # no VAR-style shared convs

    def __init__(self, levels: int = DIGITS_MAX_GREY + 1):
        super().__init__()
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
            raise ValueError(f"levels must be an int >= 2, got {levels!r}")
        self.levels = levels
        self.vocab_size = levels
        self.register_buffer("grey_values", torch.linspace(0.0, 1.0, levels).unsqueeze(1), persistent=False)

    # names some callers use for the two class attributes above
    @property
    def quant_mode(self) -> str:
        return self.mode

    @property
    def normalize_codebook(self) -> bool:
        return self.normalize_codes

    def extra_repr(self) -> str:
        return f"levels={self.levels}"

    def codebook(self) -> torch.Tensor:
        """[levels, 1]: what code k embeds to (the transformer's inputs are built from it)."""
        return self.grey_values

    # ------------------------------------------------------------------ encode
    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Grey latent [B, 1, H, W] in [0, 1] of images [B, 1 or 3, H, W] in [-1, 1]
        (RGB is averaged to grey)."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor in [-1, 1], got dtype {images.dtype} "
                            "(digits grey levels: use sar_fast.data.digits.digits_to_images)")
        if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] < 1:
            raise ValueError(f"images must be [B, 1 or 3, H, W] with B >= 1, got shape {tuple(images.shape)}")
        if images.device != self.grey_values.device:
            raise ValueError(f"images are on {images.device} but the tokenizer is on {self.grey_values.device}")
        grey = images.float().mean(dim=1, keepdim=True)
        return grey.add(1.0).mul(0.5).clamp(0.0, 1.0)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, schedule: Sequence[int]) -> list[torch.Tensor]:
        """Codes per scale, [B, s*s] int64 each; `schedule` must end at the image side."""
        latent = self.encode_latent(images)
        h, w = latent.shape[-2:]
        if h != w:
            raise ValueError(f"multi-scale codes need square images, got {h}x{w}")
        schedule = Schedule(schedule, latent_side=h)
        flat = ops.msq_encode(latent, self.grey_values, schedule, mode="flexvar", normalize=False)
        return list(flat.split(schedule.lengths, dim=1))

    # ------------------------------------------------------------------ decode
    def _flat_codes(self, codes: Codes, schedule: Sequence[int] | None) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(codes [B, L] int64, schedule) from a per-scale list, a concatenated [B, L] with its
        schedule, or one square scale [B, s*s] on its own."""
        return flatten_codes(codes, schedule, self.grey_values.device, self.vocab_size, allow_single_scale=True)

    def codes_to_latent(self, codes: Codes, schedule: Sequence[int] | None = None) -> torch.Tensor:
        """Grey latent [B, 1, s, s] of the last scale of `codes` (a per-scale list, [B, L]
        with `schedule`, or the last scale alone [B, s*s])."""
        flat, schedule = self._flat_codes(codes, schedule)
        last = schedule[-1]
        return ops.msq_decode(flat[:, -last * last:], self.grey_values, (last,), mode="flexvar", normalize=False)

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, h, w] in [0, 1] (grey replicated to RGB) from a latent [B, 1, h, w]."""
        if not isinstance(latent, torch.Tensor) or latent.dim() != 4 or latent.shape[1] != 1:
            raise ValueError(f"latent must be a [B, 1, h, w] tensor, got "
                             f"{tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__}")
        return latent.float().clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()

    @torch.no_grad()
    def decode(self, codes: Codes, schedule: Sequence[int] | None = None) -> torch.Tensor:
        """Images [B, 3, s, s] in [0, 1] from the last scale of `codes`."""
        return self.decode_latent(self.codes_to_latent(codes, schedule))

    def tf_inputs(self, codes: Codes, schedule: Sequence[int] | None = None) -> torch.Tensor:
        """Teacher-forcing input [B, L - first_l, 1] the transformer takes after its class token."""
        flat, schedule = self._flat_codes(codes, schedule)
        return ops.scale_shift(flat, self.grey_values, schedule, mode="flexvar")
