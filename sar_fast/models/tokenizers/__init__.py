"""The two multi-scale tokenizers: FlexVAR's VQ-16 (LlamaGen) and VAR's residual VQVAE.

Both take images in [-1, 1], return per-scale codes ([B, s*s] int64 each, coarsest first),
decode to images in [0, 1], and build the transformer's teacher-forcing input
(`tf_inputs`). Quantisation runs through sar_fast.ops (msq_encode / msq_decode /
scale_shift). Official checkpoints load key for key: `FlexVAE.pth`, `vae_ch160v4096z32.pth`.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..checkpoint import CheckpointError, extract_state_dict, read_checkpoint_file
from ..transformer import ScaleAR
from .base import MultiScaleTokenizer, read_state_dict
from .codebook import CODEBOOK_KIND, CodebookTokenizer, is_codebook_state, save_codebook
from .flexvq import FlexVQ16
from .grey import EMBEDDED, GreyLevelTokenizer
from .varvq import VARVQVAE

TOKENIZERS = {"flexvar": FlexVQ16, "var": VARVQVAE, CODEBOOK_KIND: CodebookTokenizer}


def detect_tokenizer_kind(sd: Mapping[str, torch.Tensor]) -> str:
    """'flexvar' (LlamaGen layout: encoder.conv_blocks.*), 'var' (encoder.down.*) or
    'codebook' (a codebook-only file: the one tensor `codebook`)."""
    if is_codebook_state(sd):
        return CODEBOOK_KIND
    flex = any(k.startswith("encoder.conv_blocks.") for k in sd)
    var = any(k.startswith("encoder.down.") for k in sd)
    if flex == var:
        raise CheckpointError("cannot tell the tokenizer kind from the keys (expected encoder.conv_blocks.* "
                              f"for FlexVAR's VQ-16 or encoder.down.* for VAR's VQVAE); found e.g. {sorted(sd)[:5]}")
    return "flexvar" if flex else "var"


def load_tokenizer(path: str | os.PathLike | Mapping[str, Any], kind: str | None = None,
                   **overrides: Any) -> MultiScaleTokenizer:
    """Load FlexVAE.pth / vae_ch160v4096z32.pth, their .safetensors conversions, an hf:// id of
    any of them (or a state dict); `kind` ('flexvar' or
    'var') is inferred from the keys when None. Returns the tokenizer frozen, in eval mode."""
    if kind is not None and kind not in TOKENIZERS:
        raise ValueError(f"kind must be one of {sorted(TOKENIZERS)} or None, got {kind!r}")
    sd = read_state_dict(path)
    try:
        detected = detect_tokenizer_kind(sd)
        if kind is not None and kind != detected:
            raise CheckpointError(f"kind={kind!r} was requested but the checkpoint is a {detected!r} tokenizer")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            tokenizer = TOKENIZERS[detected].from_checkpoint(sd, **overrides)
        for w in caught:  # e.g. the NaN/Inf weight count: say which file
            where = "" if isinstance(path, Mapping) else f"{os.fspath(path)}: "
            warnings.warn(f"{where}{w.message}", w.category, stacklevel=2)
        return tokenizer
    except CheckpointError as e:
        if isinstance(path, Mapping):
            raise
        raise CheckpointError(f"{os.fspath(path)}: {e}") from None


def preflight_tokenizer(path: str | os.PathLike, images: bool = True) -> str:
    """The kind of the tokenizer in `path`, checked without reading its weights (memory-mapped
    or, for safetensors, read off the header). `images`: the caller encodes or decodes
    images, which a codebook-only tokenizer cannot (refused here, before any work)."""
    try:
        kind = detect_tokenizer_kind(extract_state_dict(read_checkpoint_file(path, shapes_only=True))[0])
    except CheckpointError as e:
        raise CheckpointError(e if os.fspath(path) in str(e) else f"{os.fspath(path)}: {e}") from None
    if images and kind == CODEBOOK_KIND:
        raise CheckpointError(f"{os.fspath(path)} is a codebook-only tokenizer (no encoder or decoder): it serves "
                              "training from a code cache (--cache) without sample grids (--num-samples 0), "
                              "not images")
    return kind




def build_tokenizer(spec: str, device: torch.device | str) -> nn.Module:
    """The tokenizer `spec` names (a FlexVAE.pth / vae_ch160v4096z32.pth checkpoint, a
    .safetensors of one, an hf:// id, a codebook-only .safetensors (codebook.py), or EMBEDDED
    for the weight-free grey-level one), frozen (eval) on `device`."""
    tok = GreyLevelTokenizer() if spec == EMBEDDED else load_tokenizer(spec)
    return tok.to(device).eval()


def check_model_fits_tokenizer(model: ScaleAR, tokenizer: nn.Module, model_flag: str) -> None:
    """The model must predict the tokenizer's codes (vocabulary, code dim) in its scheme
    (FlexVAR's independent scales or VAR's residual ones)."""
    if (model.vocab_size, model.code_dim) != (tokenizer.vocab_size, tokenizer.Cvae) or tokenizer.mode != model.arch:
        raise SystemExit(f"error: the {model.arch} model ({model.vocab_size} codes of dim {model.code_dim}) does not "
                         f"match the {tokenizer.mode} tokenizer ({tokenizer.vocab_size} codes of dim "
                         f"{tokenizer.Cvae}); {model_flag} and --vae do not fit together")

__all__ = ["build_tokenizer", "check_model_fits_tokenizer", "EMBEDDED", "GreyLevelTokenizer", "preflight_tokenizer",
           "CodebookTokenizer", "CODEBOOK_KIND", "save_codebook",
           "FlexVQ16", "VARVQVAE", "MultiScaleTokenizer", "TOKENIZERS", "detect_tokenizer_kind", "load_tokenizer",
           "read_state_dict"]
