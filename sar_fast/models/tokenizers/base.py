"""What both multi-scale tokenizers share: input checks, the encode/decode flow through
sar_fast.ops, and strict checkpoint loading.

Conventions (both tokenizers): `encode` takes images in [-1, 1] (the [0, 1] image x 2 - 1
normalisation FlexVAR and VAR train with); `decode` returns images in [0, 1] (the decoder
output clamped to [-1, 1], then mapped by (x + 1) / 2, as VAR's sampler and FlexVAR's
`save_image(..., value_range=(-1, 1))` do). Codes are int64, one [B, s*s] tensor per scale,
row-major within a scale, coarsest scale first.
"""
from __future__ import annotations

import abc
import os
from typing import Any, Mapping, Sequence, Union

import torch
import torch.nn as nn

from ... import ops
from ...ops.reference import Phi
from ...schedules import Schedule
from ..checkpoint import (
    CheckpointError,
    check_state_fits,
    check_weight_values,
    extract_state_dict,
    read_checkpoint_file,
)

# per-scale codes: a list of [B, s*s] tensors, or all scales concatenated [B, L]
Codes = Union[torch.Tensor, Sequence[torch.Tensor]]


def read_state_dict(path_or_state_dict: str | os.PathLike | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A flat state dict from a file or mapping; a {'model': ...} wrapper (FlexVAE.pth) is
    unwrapped and 'module.' / '_orig_mod.' prefixes are dropped."""
    if isinstance(path_or_state_dict, Mapping):
        obj = path_or_state_dict
    elif isinstance(path_or_state_dict, (str, os.PathLike)):
        obj = read_checkpoint_file(path_or_state_dict)
    else:
        raise TypeError("path_or_state_dict must be a path or a state dict mapping, "
                        f"got {type(path_or_state_dict).__name__}")
    sd, _ = extract_state_dict(obj)
    return sd


def flatten_codes(codes: Codes, schedule: Sequence[int] | None, device: torch.device, vocab_size: int,
                  allow_single_scale: bool = False) -> tuple[torch.Tensor, Schedule]:
    """(codes [B, L] int64, schedule) from a per-scale list or a concatenated [B, L] (which
    needs its schedule, unless `allow_single_scale` and it is one square scale), checked:
    shapes, integer dtype, device, 0 <= code < vocab_size."""
    if isinstance(codes, torch.Tensor):
        if codes.dim() != 2:
            raise ValueError(f"codes must be [B, L] or a list of [B, s*s], got shape {tuple(codes.shape)}")
        if schedule is None:
            side = round(codes.shape[1] ** 0.5)
            if not allow_single_scale or side * side != codes.shape[1]:
                raise ValueError("concatenated codes [B, L] need the schedule they were encoded with")
            schedule = (side,)
        schedule = Schedule(schedule)
        if codes.shape[1] != schedule.total:
            raise ValueError(f"codes have {codes.shape[1]} tokens per sample but schedule {schedule} "
                             f"has {schedule.total}")
        flat = codes
    elif isinstance(codes, (list, tuple)) and codes:
        sides = []
        for i, c in enumerate(codes):
            if not isinstance(c, torch.Tensor) or c.dim() != 2:
                raise ValueError(f"codes[{i}] must be a [B, s*s] tensor, got "
                                 f"{tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}")
            side = round(c.shape[1] ** 0.5)
            if side * side != c.shape[1] or c.shape[0] != codes[0].shape[0]:
                raise ValueError(f"codes[{i}] must be [B, s*s] with B={codes[0].shape[0]}, "
                                 f"got shape {tuple(c.shape)}")
            sides.append(side)
        inferred = Schedule(sides, name="schedule of the codes")
        if schedule is not None and Schedule(schedule) != inferred:
            raise ValueError(f"schedule {tuple(schedule)} does not match the codes' scales {inferred}")
        schedule = inferred
        flat = torch.cat(list(codes), dim=1)
    else:
        raise TypeError(f"codes must be a [B, L] tensor or a non-empty list of [B, s*s] tensors, "
                        f"got {type(codes).__name__}")
    if flat.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"codes must be int64 or int32, got {flat.dtype}")
    if flat.shape[0] < 1:
        raise ValueError("codes must hold at least one sample")
    if flat.device != device:
        raise ValueError(f"codes are on {flat.device} but the tokenizer is on {device}")
    if flat.numel():
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"codes must lie in [0, {vocab_size}) (the vocabulary), got values in [{lo}, {hi}]")
    return flat.long(), schedule


class MultiScaleTokenizer(nn.Module, metaclass=abc.ABCMeta):
    """Base class; subclasses build encoder, decoder, quant_conv, post_quant_conv, quantize
    (with an `embedding`) and set vocab_size, Cvae, downsample."""

    mode: str                 # 'flexvar' or 'var': the sar_fast.ops quantisation mode
    normalize_codes: bool     # L2-normalise latent and codebook before the nearest search
    vocab_size: int
    Cvae: int
    downsample: int
    _resizable_keys: tuple[str, ...] = ()  # buffers whose checkpoint shape may differ

    # ------------------------------------------------------------------ subclass hooks
    @abc.abstractmethod
    def codebook(self) -> torch.Tensor:
        """The [V, Cvae] embedding the transformer's inputs are built from."""

    @property
    def phi(self) -> Phi | None:
        """VAR's shared convolutions between the scales (None for FlexVAR's independent
        scales): what `phi` of the ops, `sar_step` and `generate` takes."""
        return None

    @classmethod
    @abc.abstractmethod
    def infer_config(cls, sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Constructor arguments read off a state dict."""

    # ------------------------------------------------------------------ checks
    @property
    def _param(self) -> torch.Tensor:
        return self.quant_conv.weight

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor in [-1, 1], got dtype {images.dtype}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        B, _, H, W = images.shape
        if B < 1 or H < 1 or W < 1:
            raise ValueError(f"images must be non-empty, got shape {tuple(images.shape)}")
        if H % self.downsample or W % self.downsample:
            raise ValueError(f"images height and width must be multiples of {self.downsample} "
                             f"(the tokenizer's downsampling), got {H}x{W}")
        if images.device != self._param.device:
            raise ValueError(f"images are on {images.device} but the tokenizer is on {self._param.device}")

    def _check_latent(self, latent: torch.Tensor) -> None:
        if not isinstance(latent, torch.Tensor):
            raise TypeError(f"latent must be a torch.Tensor, got {type(latent).__name__}")
        if not latent.is_floating_point():
            raise TypeError(f"latent must be a float tensor, got dtype {latent.dtype}")
        if latent.dim() != 4 or latent.shape[1] != self.Cvae:
            raise ValueError(f"latent must be [B, {self.Cvae}, h, w], got shape {tuple(latent.shape)}")
        if latent.device != self._param.device:
            raise ValueError(f"latent is on {latent.device} but the tokenizer is on {self._param.device}")

    def _flat_codes(self, codes: Codes, schedule: Sequence[int] | None) -> tuple[torch.Tensor, Schedule]:
        """(codes [B, L] int64, schedule) from a per-scale list or a concatenated [B, L]."""
        return flatten_codes(codes, schedule, self._param.device, self.vocab_size)

    # ------------------------------------------------------------------ encode
    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Continuous latent [B, Cvae, H/16, W/16] of images [B, 3, H, W] in [-1, 1]
        (encoder then quant_conv; what the quantiser sees)."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images.to(self._param.dtype)))

    @torch.no_grad()
    def encode(self, images: torch.Tensor, schedule: Sequence[int]) -> list[torch.Tensor]:
        """Codes per scale, [B, s*s] int64 each, of images [B, 3, H, W] in [-1, 1].
        `schedule` must end at the latent side H/16 (square images)."""
        latent = self.encode_latent(images)
        h, w = latent.shape[-2:]
        if h != w:
            raise ValueError(f"multi-scale codes need square images, got a {h}x{w} latent "
                             f"from {tuple(images.shape[-2:])} images")
        schedule = Schedule(schedule, latent_side=h)
        flat = ops.msq_encode(latent, self.quantize.embedding.weight, schedule, mode=self.mode,
                              normalize=self.normalize_codes, phi=self.phi)
        return list(flat.split(schedule.lengths, dim=1))

    # ------------------------------------------------------------------ decode
    def decode_latent(self, latent: torch.Tensor, raw: bool = False) -> torch.Tensor:
        """Images from a latent [B, Cvae, h, w] (post_quant_conv then decoder): in [0, 1], or
        with `raw=True` the unclamped decoder output on the [-1, 1] scale."""
        self._check_latent(latent)
        # contiguous NCHW as the originals pass it (an embedding gather comes out channels-last,
        # and the conv kernels round differently on that layout)
        out = self.decoder(self.post_quant_conv(latent.to(self._param.dtype).contiguous()))
        return out if raw else out.clamp(-1, 1).add(1).mul(0.5)

    def tf_inputs(self, codes: Codes, schedule: Sequence[int] | None = None) -> torch.Tensor:
        """Teacher-forcing input [B, L - first_l, Cvae] the transformer takes after its class
        token, from per-scale codes (a list, or [B, L] with `schedule`)."""
        flat, schedule = self._flat_codes(codes, schedule)
        return self._scale_shift(flat, schedule)

    @abc.abstractmethod
    def _scale_shift(self, flat: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        """Teacher-forcing inputs from concatenated codes (flexvar or var semantics)."""

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_checkpoint(cls, path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                        **overrides: Any) -> "MultiScaleTokenizer":
        """Build from an official checkpoint (or any state dict of this layout), sizes read
        off the weights (`overrides` win, e.g. norm_groups), keys checked strictly; returns
        the model frozen (eval, no grad), like the originals use it."""
        sd = read_state_dict(path_or_state_dict)
        config = cls.infer_config(sd)
        config.update(overrides)
        model = cls(**config)
        model.load_strict(sd)
        model.eval().requires_grad_(False)
        return model

    def load_strict(self, sd: Mapping[str, torch.Tensor]) -> None:
        """load_state_dict(strict=True), raising CheckpointError that lists every missing,
        unexpected and mis-shaped key instead of PyTorch's first failure."""
        own = self.state_dict()
        check_state_fits(own, sd, type(self).__name__, resizable=self._resizable_keys)
        check_weight_values(own, sd)
        self.load_state_dict(sd, strict=True)


def _count_indexed(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many consecutive `prefix{i}.` entries (i = 0, 1, ...) the state dict has."""
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in sd):
        n += 1
    return n


def _require(sd: Mapping[str, torch.Tensor], keys: Sequence[str], what: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise CheckpointError(f"not a {what} state dict: missing {missing} (found e.g. {sorted(sd)[:5]})")
