"""The scale-wise autoregressive transformer, in its FlexVAR and VAR variants.

Parameter names equal the original implementations', so their checkpoints load key for
key (see checkpoint.py). What differs between the variants is only the input side:

- flexvar: a 2D position table (1, C, 32, 32), area-resized to every scale's side, so any
  schedule works; no level embedding; inputs are non-residual (upsampled code maps).
- var: a learned position table (1, L, C) for one fixed schedule plus a level embedding
  per scale; inputs are VAR's residual f_hat maps.

The blocks (AdaLN self-attention with L2-normalised q/k and a learned per-head scale) and
the head (AdaLN before a linear head) are shared. Attention runs through sar_fast.ops, so
the Triton kernel swaps in without touching this file.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..rng import STREAM_DROP_PATH, STREAM_LABEL_DROP, SampleKey, keyed_uniform
from ..schedules import STANDARD_SCHEDULE, Schedule
from .blocks import AdaLNBeforeHead, AdaLNSelfAttn, KVCache, apply_head
from .generate import generate

ARCHS = ("flexvar", "var")
HeadFn = Callable[[torch.Tensor, nn.Linear], Any]  # (hidden [B, L, C], head) -> anything


@dataclass
class ModelConfig:
    arch: str = "flexvar"
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    vocab_size: int = 8912
    code_dim: int = 32
    num_classes: int = 1000
    norm_eps: float = 1e-6
    attn_l2_norm: bool = True
    cond_drop_rate: float = 0.1       # label dropout for classifier-free guidance
    drop_path_rate: float = 0.0       # stochastic depth, linearly increasing over blocks
    pos_grid: int = 32                # flexvar: side of the 2D position table
    # var: the one schedule the position table is built for; flexvar: the default schedule
    schedule: Schedule = field(default=STANDARD_SCHEDULE)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        for name in ("depth", "embed_dim", "num_heads", "vocab_size", "code_dim", "num_classes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.schedule = Schedule(self.schedule, name="config.schedule")
        if self.schedule[0] != 1:
            raise ValueError(f"the first scale must be 1x1 (the class token), got schedule {tuple(self.schedule)}")
        if not 0.0 <= self.cond_drop_rate < 1.0:
            raise ValueError(f"cond_drop_rate must be in [0, 1), got {self.cond_drop_rate}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schedule"] = list(self.schedule)
        return d


def preset_config(name: str, **overrides) -> ModelConfig:
    """'flexvar-d16', 'var-d24', ..., or 'flexvar-tiny' / 'var-tiny' (tests, laptops).

    Depth d -> width 64d, d heads of dim 64, as in VAR/FlexVAR. FlexVAR: vocab 8912
    (LlamaGen VQ-16), VAR: vocab 4096; both code dim 32. Stochastic depth 0.1*d/24.
    """
    try:
        arch, size = name.lower().split("-", 1)
    except ValueError:
        raise ValueError(f"preset must look like 'flexvar-d16' or 'var-tiny', got {name!r}") from None
    if arch not in ARCHS:
        raise ValueError(f"preset arch must be one of {ARCHS}, got {name!r}")
    base = dict(arch=arch, vocab_size=8912 if arch == "flexvar" else 4096, code_dim=32)
    if size == "tiny":
        base.update(depth=2, embed_dim=64, num_heads=4, vocab_size=64, code_dim=8, num_classes=10)
    elif size.startswith("d") and size[1:].isdigit():
        d = int(size[1:])
        base.update(depth=d, embed_dim=64 * d, num_heads=d, drop_path_rate=0.1 * d / 24)
    else:
        raise ValueError(f"unknown preset size {size!r} in {name!r}: use tiny or d<depth> (d16, d20, d24, d30)")
    base.update(overrides)
    return ModelConfig(**base)


class ScaleAR(nn.Module):
    """Class-conditional next-scale prediction (FlexVAR or VAR, see the module docstring).

    Call convention of the originals: `model(label_B, x_BLCv_wo_first_l, schedule)` ->
    logits [B, L, V], where x holds the teacher-forcing inputs of scales 2..n.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        C, first_l = cfg.embed_dim, 1
        self.num_classes, self.vocab_size, self.code_dim = cfg.num_classes, cfg.vocab_size, cfg.code_dim
        self.word_embed = nn.Linear(cfg.code_dim, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # last row: the null class (CFG)
        self.pos_start = nn.Parameter(torch.zeros(1, first_l, C))
        if cfg.arch == "flexvar":
            self.pos_1LC = nn.Parameter(sincos_table_2d(cfg.pos_grid, C))
        else:
            self.pos_1LC = nn.Parameter(torch.zeros(1, cfg.schedule.total, C))
            self.lvl_embed = nn.Embedding(len(cfg.schedule), C)
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(C, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.attn_l2_norm, rates[i])
            for i in range(cfg.depth))
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)
        self._check_label_range = True
        self._sample_key: SampleKey | None = None
        self.init_weights()

    # ------------------------------------------------------------------ setup
    @property
    def arch(self) -> str:
        return self.config.arch

    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5,
                     init_head: float = 0.02) -> None:
        """VAR's initialisation: truncated normal std sqrt(1/(3C)), zero biases, small head,
        AdaLN gammas near zero so every block starts close to the identity."""
        C, std = self.config.embed_dim, math.sqrt(1 / self.config.embed_dim / 3)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_start, std=std)
        if self.arch == "var":
            nn.init.trunc_normal_(self.pos_1LC, std=std)
        with torch.no_grad():
            self.head.weight.mul_(init_head)
            self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
            for block in self.blocks:
                block.attn.proj.weight.div_(math.sqrt(2 * len(self.blocks)))
                block.ffn.fc2.weight.div_(math.sqrt(2 * len(self.blocks)))
                block.ada_lin[-1].weight[2 * C:].mul_(init_adaln)
                block.ada_lin[-1].weight[:2 * C].mul_(init_adaln_gamma)
                nn.init.zeros_(block.attn.q_bias)
                nn.init.zeros_(block.attn.v_bias)

    def set_label_range_check(self, enabled: bool) -> ScaleAR:
        """The label range check costs a host sync per forward; a trainer that checks every
        batch on the host before it reaches the device turns it off."""
        self._check_label_range = bool(enabled)
        return self

    def set_sample_key(self, key: SampleKey | None) -> ScaleAR:
        """Key the training noise (label dropout, drop-path) of the next forwards by
        (seed, step, global row) instead of the global RNG, so a sample draws the same on
        any number of ranks and micro-batches (sar_fast.rng). Every forward of a step (TF,
        null class, student) sees the same key: a row's label is dropped in all of them.
        A batch of k * len(rows) rows (e.g. conditional + null class stacked) repeats the
        rows. None: draw from the global RNG (library use, tests)."""
        if key is not None and (key.rows.dim() != 1 or key.rows.is_floating_point()):
            raise ValueError(f"SampleKey.rows must be an int tensor [B], got {tuple(key.rows.shape)} {key.rows.dtype}")
        self._sample_key = key
        return self

    def _uniforms(self, B: int, streams: Sequence[int], device: torch.device) -> torch.Tensor:
        """[B, len(streams)] uniforms: keyed by the sample key when one is set."""
        key = self._sample_key
        if key is None:
            return torch.rand(B, len(streams), device=device)
        rows = key.rows.to(device)
        if B % rows.shape[0]:
            raise ValueError(f"the sample key has {rows.shape[0]} rows but the batch {B}: set_sample_key "
                             f"with the rows of this batch")
        rows = rows.repeat(B // rows.shape[0])
        return torch.stack([keyed_uniform(key.seed, key.step, s, rows) for s in streams], dim=1)

    def check_schedule(self, schedule: Sequence[int] | None) -> Schedule:
        """`schedule` (default: the config's) as a Schedule that this model can run."""
        if schedule is None:
            return self.config.schedule
        schedule = Schedule(schedule)
        if schedule[0] != 1:
            raise ValueError(f"schedule must start with the 1x1 scale, got {schedule}")
        if self.arch == "var" and schedule != self.config.schedule[:len(schedule)]:
            raise ValueError(f"a VAR model only runs the schedule its position table was built for, "
                             f"{self.config.schedule} (or a prefix of it); got {schedule}")
        if self.arch == "flexvar" and schedule[-1] > self.config.pos_grid:
            raise ValueError(f"schedule side {schedule[-1]} exceeds the position table ({self.config.pos_grid})")
        return schedule

    # ------------------------------------------------------------------ inputs
    def embed_inputs(self, x_BLCv: torch.Tensor) -> torch.Tensor:
        """word_embed in the parameter dtype (fp32, or bf16 under FSDP mixed precision)."""
        return self.word_embed(x_BLCv.to(self.word_embed.weight.dtype))

    def pos_embed(self, schedule: Sequence[int], scale_ids: Sequence[int] | None = None) -> torch.Tensor:
        """Position (and, for VAR, level) embedding [1, sum(s^2), C] of the given scales.

        flexvar: the 2D table area-resized to each side. var: the rows of scale i in the
        fixed table plus lvl_embed[i]; `scale_ids` says which scales of the model's schedule
        (default: the first len(schedule), in order).
        """
        if self.arch == "flexvar":
            pieces = []
            for s in schedule:
                table = F.interpolate(self.pos_1LC.float(), size=(s, s), mode="area")
                pieces.append(table.flatten(2).transpose(1, 2))
            return torch.cat(pieces, dim=1)
        offsets = self.config.schedule.offsets
        ids = range(len(schedule)) if scale_ids is None else scale_ids
        pieces = [self.pos_1LC[:, offsets[i]:offsets[i + 1]].float() + self.lvl_embed.weight[i].float()
                  for i in ids]
        return torch.cat(pieces, dim=1)

    def class_condition(self, label_B: torch.Tensor) -> torch.Tensor:
        """Class embedding [B, C]; in training, labels drop to the null class with
        probability cond_drop_rate (the original applies it in eval too; we don't)."""
        if (not isinstance(label_B, torch.Tensor) or label_B.dim() != 1
                or label_B.dtype not in (torch.int64, torch.int32)):
            raise ValueError(f"label_B must be an int64 tensor [B], got "
                             f"{getattr(label_B, 'shape', type(label_B).__name__)} {getattr(label_B, 'dtype', '')}")
        if self._check_label_range and label_B.numel() and \
                (int(label_B.min()) < 0 or int(label_B.max()) > self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = null class), "
                             f"got [{int(label_B.min())}, {int(label_B.max())}]")
        if self.training and self.config.cond_drop_rate > 0:
            u = self._uniforms(label_B.shape[0], (STREAM_LABEL_DROP,), label_B.device)[:, 0]
            drop = u < self.config.cond_drop_rate
            label_B = torch.where(drop, torch.full_like(label_B, self.num_classes), label_B)
        return self.class_emb(label_B.long())

    def _check_inputs(self, x: torch.Tensor, B: int, length: int, name: str) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
            raise ValueError(f"{name} must be a float tensor [B, {length}, {self.code_dim}], "
                             f"got {getattr(x, 'shape', type(x).__name__)}")
        if tuple(x.shape) != (B, length, self.code_dim):
            raise ValueError(f"{name} must have shape ({B}, {length}, {self.code_dim}), got {tuple(x.shape)}")

    # ------------------------------------------------------------------ forward
    def trunk(self, x_BLC: torch.Tensor, cond: torch.Tensor,
              scale_lens: Sequence[int] | ops.ScaleLayout) -> torch.Tensor:
        """Blocks + AdaLN-before-head: the hidden states [B, L, C] the head maps to logits
        (what the fused head+CE loss takes). The schedule reaches the blocks as a layout
        of tensors, so compiled blocks do not recompile for each schedule."""
        layout = scale_lens if isinstance(scale_lens, ops.ScaleLayout) else ops.scale_layout(scale_lens, x_BLC.device)
        B = x_BLC.shape[0]
        for i, block in enumerate(self.blocks):
            drop = None
            if self.training and self.config.drop_path_rate > 0 and block.drop_path > 0:
                streams = (STREAM_DROP_PATH + 2 * i, STREAM_DROP_PATH + 2 * i + 1)
                drop = block.drop_path_scales(self._uniforms(B, streams, x_BLC.device))
            x_BLC = block(x_BLC, cond, layout, None, drop)
        return self.head_nm(x_BLC, cond)

    def _output(self, hidden: torch.Tensor, return_hidden: bool, head_fn: HeadFn | None):
        if head_fn is not None:  # the fused losses get operands in the head's dtype (bf16 GEMM, fp32 loss)
            return head_fn(hidden.to(self.head.weight.dtype), self.head)
        return hidden if return_hidden else apply_head(self.head, hidden)

    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor,
                schedule: Sequence[int] | None = None, return_hidden: bool = False,
                head_fn: HeadFn | None = None):
        """Teacher forcing: logits [B, L, V], or the pre-head hidden states [B, L, C] with
        return_hidden, or head_fn(hidden, head) — e.g. a fused head + loss that never builds
        the logits. head_fn runs inside forward so FSDP's hooks cover the head's weights."""
        schedule = self.check_schedule(schedule)
        B, L = label_B.shape[0], schedule.total
        self._check_inputs(x_BLCv_wo_first_l, B, L - 1, "x_BLCv_wo_first_l")
        with torch.autocast(device_type=label_B.device.type, enabled=False):
            cond = self.class_condition(label_B)
            sos = cond.unsqueeze(1) + self.pos_start
            x = torch.cat((sos, self.embed_inputs(x_BLCv_wo_first_l)), dim=1)
            x = x + self.pos_embed(schedule)
        return self._output(self.trunk(x, cond, schedule.lengths), return_hidden, head_fn)

    def forward_student(self, label_B: torch.Tensor, x_BlCv: torch.Tensor, side: int,
                        scale_index: int | None = None, return_hidden: bool = False,
                        head_fn: HeadFn | None = None):
        """Student forcing, as in SAR: the class token followed by one scale's inputs
        (layout [1, side*side]); returns logits [B, side*side, V] for that scale only.

        The class token gets the first scale's position but no pos_start (as in SAR's code).
        VAR needs `scale_index`, the index of that scale in its schedule.
        """
        B, n = label_B.shape[0], side * side
        self._check_inputs(x_BlCv, B, n, "x_BlCv")
        if self.arch == "var":
            if scale_index is None or not 0 < scale_index < len(self.config.schedule) \
                    or self.config.schedule[scale_index] != side:
                raise ValueError(f"VAR student forcing needs scale_index of side {side} in {self.config.schedule}, "
                                 f"got {scale_index}")
            ids = (0, scale_index)
        else:
            self.check_schedule((1, side)) if side > 1 else None
            ids = None
        with torch.autocast(device_type=label_B.device.type, enabled=False):
            cond = self.class_condition(label_B)
            x = torch.cat((cond.unsqueeze(1), self.embed_inputs(x_BlCv)), dim=1)
            x = x + self.pos_embed((1, side), scale_ids=ids)
        return self._output(self.trunk(x, cond, (1, n))[:, 1:], return_hidden, head_fn)

    def generate(self, codebook: torch.Tensor, labels: torch.Tensor, schedule: Sequence[int] | None = None,
                 **kwargs):
        """sar_fast.models.generate.generate on this model (a method, so FSDP can register it
        as a forward method and unshard the root's weights for it)."""
        return generate(self, codebook, labels, schedule, **kwargs)

    @torch.no_grad()
    def step_with_cache(self, x_BlC: torch.Tensor, cond: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """Sampling: run one scale's tokens [B, l, C] (already embedded + positioned) against
        the per-block KV caches (updated in place); returns that scale's logits [B, l, V]."""
        for block, cache in zip(self.blocks, caches):
            x_BlC = block(x_BlC, cond, None, cache)
        return apply_head(self.head, self.head_nm(x_BlC, cond))


def sincos_table_2d(grid: int, dim: int) -> torch.Tensor:
    """FlexVAR's initial 2D position table (1, dim, grid, grid): even channels sin(y * f_j),
    odd channels cos(x * f_j), f_j = 10000^(-2j/dim). A learned parameter afterwards."""
    if dim % 2:
        raise ValueError(f"embed_dim must be even for the 2D position table, got {dim}")
    freqs = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    coords = torch.arange(grid, dtype=torch.float32)
    table = torch.zeros(grid, grid, dim)
    table[:, :, 0::2] = torch.sin(coords[:, None, None] * freqs)          # y varies along rows
    table[:, :, 1::2] = torch.cos(coords[None, :, None] * freqs)          # x varies along columns
    return table.permute(2, 0, 1).unsqueeze(0).contiguous()
