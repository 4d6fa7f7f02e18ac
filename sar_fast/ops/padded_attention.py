"""Block-causal scale attention over a padded sequence (Infinity's layout).

Infinity pads its sequence to a multiple of `pad_to_multiplier`; its SDPA bias lets each of
the padded rows (past the last scale) see token 0 only, and no real row sees a padded key.

The padded tail is handled here, outside the kernel: a row that attends to exactly one key
has softmax weight 1 on it, so its output is v[token 0] whatever q and k hold, and its
gradient goes only to dV[0] (the softmax over one key has zero derivative in the score, so
dQ and dK get nothing from it). The kernel therefore runs on the real rows alone (no work and
no mask evaluation for padding, no new kernel variant to compile or tune), and the tail is a
broadcast of v[:, :, 0] whose backward autograd sums into dV[0].

Infinity's FlexAttention mask differs for the padded rows: it appends the tail as one more
"document" (`same_doc | causal`), so a padded row sees every token. Both give the real rows
the same outputs and gradients (they never see a padded key), and Infinity discards the
padded rows (`x_BLC[:, :l_end]` before the head), so their value never reaches the loss;
here they follow the SDPA bias.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import backend, reference
from .attention import ScaleLayout, _check_qkv, _check_softmax_scale, cached_attention, scale_causal_attention


def _check_pad(pad, L: int) -> int:
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be an int >= 0 (padded rows after the last scale), got {pad!r}")
    if pad >= L:
        raise ValueError(f"pad={pad} leaves no real token in a sequence of L={L} (q's dim 2)")
    return pad


def _append_tail(real: torch.Tensor, v: torch.Tensor, pad: int) -> torch.Tensor:
    """real [B, H, l, D] then `pad` copies of v[:, :, 0], as a [B, H, l + pad, D] view of
    [B, l + pad, H, D] memory (the model's reshape to [B, L, C] then costs no copy)."""
    B, H, _, D = real.shape
    tail = v[:, :, :1].to(real.dtype).expand(B, H, pad, D)
    return torch.cat((real.transpose(1, 2), tail.transpose(1, 2)), dim=1).transpose(1, 2)


def padded_scale_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  scale_lens: Sequence[int] | ScaleLayout, pad: int = 0,
                                  softmax_scale: float | None = None) -> torch.Tensor:
    """q, k, v [B, H, L, D] -> [B, H, L, D] with L = sum(scale_lens) + pad: the first
    sum(scale_lens) rows attend block-causally over the real tokens (as scale_causal_attention),
    the last `pad` rows attend to token 0 only. scale_lens may be a ScaleLayout of the real
    tokens (a compiled model's schedule as tensors)."""
    _check_qkv(q, k, v, same_len=True)
    L = q.shape[2]
    pad = _check_pad(pad, L)
    _check_softmax_scale(softmax_scale)
    if not isinstance(scale_lens, ScaleLayout):
        lens = tuple(int(n) for n in scale_lens)
        if not lens or min(lens) < 1:
            raise ValueError(f"scale_lens must be positive token counts, got {lens}")
        if sum(lens) + pad != L:
            raise ValueError(f"scale_lens sum to {sum(lens)} and pad={pad}, but q has L={L} tokens "
                             f"(sum(scale_lens) + pad expected)")
        if backend.get_backend() == "reference":
            return reference.padded_scale_causal_attention(q, k, v, lens, pad, softmax_scale)
        scale_lens = lens
    real_len = L - pad
    if pad == 0:
        return scale_causal_attention(q, k, v, scale_lens, softmax_scale)
    real = scale_causal_attention(q[:, :, :real_len], k[:, :, :real_len], v[:, :, :real_len], scale_lens,
                                  softmax_scale)
    return _append_tail(real, v, pad)


def padded_cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: int = 0,
                            softmax_scale: float | None = None) -> torch.Tensor:
    """Sampling with a padded query block: q [B, H, l + pad, D] against the cache k, v
    [B, H, L', D]; the first l rows see every cached key (as cached_attention), the last
    `pad` rows key 0 only."""
    _check_qkv(q, k, v, same_len=False)
    pad = _check_pad(pad, q.shape[2])
    _check_softmax_scale(softmax_scale)
    if backend.get_backend() == "reference":
        return reference.padded_cached_attention(q, k, v, pad, softmax_scale)
    if pad == 0:
        return cached_attention(q, k, v, softmax_scale)
    real = cached_attention(q[:, :, :q.shape[2] - pad], k, v, softmax_scale)
    return _append_tail(real, v, pad)
