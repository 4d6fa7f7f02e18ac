"""A tokenizer that is only a codebook: for codes that no encoder made (the oracle study's
teacher samples them, sar_fast.study.oracle). It gives the transformer what it needs to
train on a code cache: the [V, Cvae] embedding its inputs are built from (`codebook`,
`tf_inputs`, FlexVAR-style independent scales), `vocab_size`, `Cvae`, `mode`. It has no
images: `encode` and `decode` raise, naming what to use instead.

File: a .safetensors holding exactly one tensor, `codebook` [V, Cvae] floating point (what
`save_codebook` writes); `build_tokenizer` recognises it by that key.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from ... import ops
from ..checkpoint import CheckpointError, write_safetensors
from .base import Codes, flatten_codes

CODEBOOK_KEY = "codebook"
CODEBOOK_KIND = "codebook"  # what detect_tokenizer_kind calls a codebook-only file


def check_codebook(book: Any, what: str = "codebook") -> torch.Tensor:
    """`book` as a float32 CPU tensor [V, Cvae] with V >= 2, finite; a clear error otherwise."""
    if not isinstance(book, torch.Tensor) or book.dim() != 2 or not book.is_floating_point():
        raise CheckpointError(f"{what} must be a floating-point tensor [V, Cvae], got "
                              f"{tuple(book.shape) if isinstance(book, torch.Tensor) else type(book).__name__}"
                              f"{' ' + str(book.dtype) if isinstance(book, torch.Tensor) else ''}")
    if book.shape[0] < 2 or book.shape[1] < 1:
        raise CheckpointError(f"{what} must hold at least 2 codes of dim >= 1, got shape {tuple(book.shape)}")
    if book.device.type != "meta" and not bool(torch.isfinite(book).all()):
        raise CheckpointError(f"{what} has non-finite (NaN/Inf) entries")
    return book.detach().to(torch.float32)


def save_codebook(book: torch.Tensor, path: str | os.PathLike) -> None:
    """Write `book` [V, Cvae] as a codebook-only tokenizer file (.safetensors, atomically)."""
    if not os.fspath(path).endswith(".safetensors"):
        raise ValueError(f"a codebook file must end in .safetensors, got {os.fspath(path)!r}")
    write_safetensors({CODEBOOK_KEY: check_codebook(book).cpu()}, path)


def is_codebook_state(sd: Mapping[str, Any]) -> bool:
    return set(sd) == {CODEBOOK_KEY}


class CodebookTokenizer(nn.Module):
    """Codes without images: a fixed [V, Cvae] codebook, FlexVAR-style independent scales
    (each scale's inputs: its codes' embeddings, upsampled; no normalisation)."""

    mode = "flexvar"
    normalize_codes = False
    phi = None  # no VAR-style shared convs

    def __init__(self, book: torch.Tensor):
        super().__init__()
        book = check_codebook(book)
        self.vocab_size, self.Cvae = int(book.shape[0]), int(book.shape[1])
        self.register_buffer("embedding", book.clone(), persistent=False)

    @classmethod
    def from_checkpoint(cls, sd: Mapping[str, torch.Tensor], **overrides: Any) -> "CodebookTokenizer":
        """From the state dict of a codebook file: exactly the one `codebook` tensor."""
        if overrides:
            raise TypeError(f"a codebook-only tokenizer takes no settings, got {sorted(overrides)}")
        if not is_codebook_state(sd):
            raise CheckpointError(f"a codebook-only tokenizer file holds exactly one tensor {CODEBOOK_KEY!r}; "
                                  f"found {sorted(sd)[:5]}")
        return cls(sd[CODEBOOK_KEY]).eval().requires_grad_(False)

    @property
    def downsample(self) -> int:
        raise AttributeError("a codebook-only tokenizer has no images (no downsampling factor): train on a code "
                             "cache (--cache) made from its codes")

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, Cvae={self.Cvae}"

    def codebook(self) -> torch.Tensor:
        """[V, Cvae]: what code k embeds to (the transformer's inputs are built from it)."""
        return self.embedding

    def encode(self, images: Any, schedule: Sequence[int] | None = None) -> list[torch.Tensor]:
        raise TypeError("a codebook-only tokenizer cannot encode images (it has no encoder): its codes come from "
                        "a code cache (--cache), e.g. the oracle study's teacher samples")

    def decode(self, codes: Any, schedule: Sequence[int] | None = None) -> torch.Tensor:
        raise TypeError("a codebook-only tokenizer cannot decode codes to images (it has no decoder); measure "
                        "codes directly (sar_fast.study.oracle), or use --num-samples 0 when training")

    def tf_inputs(self, codes: Codes, schedule: Sequence[int] | None = None) -> torch.Tensor:
        """Teacher-forcing input [B, L - 1, Cvae] the transformer takes after its class token."""
        flat, schedule = flatten_codes(codes, schedule, self.embedding.device, self.vocab_size)
        return ops.scale_shift(flat, self.embedding, schedule, mode="flexvar")


def unit_codebook(vocab: int, code_dim: int, generator: torch.Generator) -> torch.Tensor:
    """A random codebook [vocab, code_dim] of unit-norm rows (like FlexVAR's L2-normalised VQ
    codebook), float32, from `generator`."""
    for name, value, low in (("vocab", vocab, 2), ("code_dim", code_dim, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    book = torch.randn(vocab, code_dim, generator=generator, dtype=torch.float64)
    return (book / book.norm(dim=1, keepdim=True).clamp_min(math.ulp(1.0))).float()
