"""The FLOP model of a training step and the throughput / MFU meter built on it."""
from __future__ import annotations

import time

import torch

from ..schedules import Schedule


def flops_per_token(depth: int, dim: int, vocab: int, mlp_ratio: float, mean_context: float) -> float:
    """Forward FLOPs per token: 2 x (qkv + proj + MLP + AdaLN matmuls) per block, attention
    scores and values against `mean_context` visible keys, and the head."""
    per_block = 2 * (3 * dim * dim + dim * dim + 2 * mlp_ratio * dim * dim + 6 * dim * dim) + 4 * mean_context * dim
    return depth * per_block + 2 * dim * vocab


def mean_visible_keys(schedule) -> float:
    """Average number of keys a token sees under the block-causal mask (scale sides)."""
    return mean_visible_keys_of_lengths(Schedule(schedule).lengths)


def mean_visible_keys_of_lengths(scale_lens) -> float:
    """The same for scales given by their token counts."""
    total, seen, acc = 0, 0, 0
    for n in scale_lens:
        seen += n
        acc += n * seen
        total += n
    return acc / max(total, 1)


class PassFlops:
    """Model FLOPs of the passes a step really ran (TF, null-class prefix, student, ...),
    counted from the tokens entering the first block: each call adds the forward FLOPs of
    its B x L tokens, three times that when it builds a graph (forward + backward).
    Calls while not `enabled` (sampling) are not counted, nor are activation checkpointing's
    recomputations: they run the block's forward function, not the module call whose hook
    counts (parallel.recompute_in_backward)."""

    def __init__(self, first_block: torch.nn.Module, model_config):
        self.config, self.enabled = model_config, False
        self.flops, self.tokens = 0.0, 0
        first_block.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        if not self.enabled:
            return
        x, layout = args[0], args[2] if len(args) > 2 else None
        B, L = x.shape[0], x.shape[1]
        c = self.config
        off = getattr(layout, "off", None)  # an ops.ScaleLayout: scale offsets [n + 1] on the device
        if off is not None:  # kept a tensor (no host sync); read on logged steps only
            off = off.double()
            keys = ((off[1:] - off[:-1]) * off[1:]).sum() / off[-1].clamp(min=1)
        else:
            keys = mean_visible_keys_of_lengths(layout if layout else (L,))
        passes = 3.0 if torch.is_grad_enabled() else 1.0
        self.flops += passes * flops_per_token(c.depth, c.embed_dim, c.vocab_size, c.mlp_ratio, keys) * B * L
        self.tokens += B * L

    def take(self) -> tuple[float | torch.Tensor, int]:
        """(FLOPs, tokens) since the last take; the FLOPs may be a device scalar (Throughput
        converts it when it is read, on a logged step)."""
        out, self.flops, self.tokens = (self.flops, self.tokens), 0.0, 0
        return out


class Throughput:
    """Images, tokens and model FLOPs trained since the last read, as rates over all ranks,
    and the MFU they make (None where the GPU's peak is unknown)."""

    def __init__(self, model_config, device: torch.device, world_size: int):
        self.config, self.peak, self.world_size = model_config, peak_flops(device), world_size
        self.reset()

    def reset(self) -> None:
        self.start, self.images, self.tokens, self.flops = time.time(), 0, 0, 0.0

    def add(self, images: int, flops: float, tokens: int) -> None:
        """One step of this rank: its images, and the FLOPs and tokens of all its passes
        (PassFlops.take())."""
        self.flops += flops
        self.tokens += tokens
        self.images += images

    def read(self) -> dict:
        dt = max(time.time() - self.start, 1e-9)
        rates = {"img_per_s": self.images * self.world_size / dt, "tokens_per_s": self.tokens * self.world_size / dt,
                 "mfu": (float(self.flops) / dt / self.peak) if self.peak else None}
        self.reset()
        return rates


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU (None on CPU or an unknown GPU): the MFU denominator."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16.items():
        if key in name:
            return value
    return None


_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}
