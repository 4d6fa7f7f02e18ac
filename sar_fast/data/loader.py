"""Batches for the trainer: a resumable distributed sampler and DataSource, which turns a
dataset (images, code cache or the embedded digits) into (labels, codes, schedule)."""
from __future__ import annotations

import math
import random
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from ..ops.gpu import to_device_async
from ..rng import schedule_seed
from ..schedules import Schedule, random_flexvar_schedule
from .codes import CodeDataset, check_cache_matches, schedule_token_index
from .common import check_int, collate
from .digits import EmbeddedDigitsDataset
from .images import ImageFolderDataset


# ---------------------------------------------------------------------- sampler
class ResumableDistributedSampler(Sampler[int]):
    """Per-epoch permutation (torch.Generator seeded with seed + epoch) split over ranks
    as rank::world_size, resumable mid-epoch.

    The position is what the trainer has consumed, not what was iterated (a DataLoader
    prefetches ahead): call `advance(n)` after each batch of n samples; `state_dict()`
    then holds (epoch, position), and after `load_state_dict` the next `__iter__` yields
    exactly the rest of that epoch. `set_epoch(e)` with a new epoch restarts at position
    0; with the current epoch (as a resumed loop does) it keeps the position.
    drop_last=True drops the permutation's tail so every rank gets length // world_size;
    False pads by repeating its head (as torch's DistributedSampler).
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        self.length = check_int("length", length, 1)
        self.world_size = check_int("world_size", world_size, 1)
        self.rank = check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be < world_size ({self.world_size}), got {rank}")
        self.seed = check_int("seed", seed, 0)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        if self.drop_last and self.length < self.world_size:
            raise ValueError(f"length {self.length} < world_size {self.world_size}: with drop_last "
                             "some ranks would get no samples")
        self.num_samples = (self.length // self.world_size if self.drop_last
                            else math.ceil(self.length / self.world_size))
        self.epoch, self.position = 0, 0

    def epoch_indices(self, epoch: int | None = None) -> list[int]:
        """This rank's whole index list for `epoch` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(self.length))
        total = self.num_samples * self.world_size
        if total > len(order):
            order += (order * math.ceil(total / len(order)))[:total - len(order)]
        return order[:total][self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.position:])

    def global_positions(self, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """int64 [count] on `device`: where this rank's positions start..start+count-1 of the
        epoch sit in the epoch's global order (rank r holds global positions r, r + W, ...).
        The same sample has the same global position on any number of ranks. Built on the
        device (an arange): no host-to-device copy per batch."""
        return torch.arange(start, start + count, dtype=torch.int64, device=device) * self.world_size + self.rank

    def __len__(self) -> int:
        """What the next `__iter__` yields: the rest of the current epoch."""
        return self.num_samples - self.position

    def set_epoch(self, epoch: int) -> None:
        epoch = check_int("epoch", epoch, 0)
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def advance(self, num_samples: int) -> None:
        """Record that `num_samples` more samples of this epoch were consumed."""
        num_samples = check_int("num_samples", num_samples, 0)
        if self.position + num_samples > self.num_samples:
            raise ValueError(f"advance({num_samples}) would pass the end of the epoch "
                             f"(position {self.position} of {self.num_samples})")
        self.position += num_samples

    def state_dict(self) -> dict[str, int | bool]:
        return dict(epoch=self.epoch, position=self.position, seed=self.seed, length=self.length,
                    world_size=self.world_size, shuffle=self.shuffle, drop_last=self.drop_last)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "length", "world_size", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has "
                                 f"{key}={getattr(self, key)!r}; the data order would not continue")
        epoch, position = check_int("epoch", state["epoch"], 0), check_int("position", state["position"], 0)
        if position > self.num_samples:
            raise ValueError(f"sampler state position {position} > samples per epoch {self.num_samples}")
        self.epoch, self.position = epoch, position


# ---------------------------------------------------------------------- the trainer's batches
class DataSource:
    """Batches of (labels, codes [B, L], schedule) for the local rank, resumable."""

    # cfg: the run's config.DataConfig (not imported: config validates through this module)
    def __init__(self, cfg, seed: int, info, tokenizer, local_batch: int, num_classes: int):
        self.cfg, self.seed, self.info, self.tok, self.local_batch = cfg, seed, info, tokenizer, local_batch
        self.num_classes = num_classes
        if cfg.cache:
            self.dataset = CodeDataset(cfg.cache, seed=seed)
            self.cache_schedule = self.dataset.cache_schedule
            check_cache_matches(self.dataset.manifest, cfg, tokenizer)
        elif cfg.folder:
            self.dataset = ImageFolderDataset(cfg.folder, resolution=cfg.resolution, train=True, seed=seed,
                                              bad_images=cfg.bad_images)
            self.cache_schedule = None
        else:
            self.dataset = EmbeddedDigitsDataset("train", seed=0)
            self.cache_schedule = None
        self.sampler = ResumableDistributedSampler(len(self.dataset), info.rank, info.world_size, seed=seed)
        if self.sampler.num_samples < local_batch:
            raise SystemExit(f"error: {len(self.dataset)} samples cannot fill a per-rank batch of {local_batch}")
        self._iter = None
        self.rows: torch.Tensor | None = None  # global rows of the batch `next` returned last

    @property
    def skipped_images(self) -> int:
        """Unusable images of --data skipped so far (0 for caches and the embedded digits)."""
        return getattr(self.dataset, "num_skipped", 0)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.num_samples // self.local_batch

    def _loader(self):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.sampler.epoch)
        return iter(DataLoader(self.dataset, batch_size=self.local_batch, sampler=self.sampler, drop_last=True,
                               num_workers=self.cfg.workers, collate_fn=collate,
                               pin_memory=self.info.device.type == "cuda", persistent_workers=False,
                               # its own generator: the loader must not draw from the global RNG
                               # (label dropout's), or a resumed run would drift from a straight one
                               generator=torch.Generator().manual_seed(self.seed + self.sampler.epoch)))

    def next(self, step: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        if self._iter is None:
            self._iter = self._loader()
        if self.sampler.num_samples - self.sampler.position < self.local_batch:  # epoch done
            self.sampler.set_epoch(self.sampler.epoch + 1)
            self._iter = self._loader()
        x, labels = next(self._iter)
        # each row's position in the epoch's global order: the key of its randomness
        # (SSR draws), so it does not depend on the number of ranks or micro-batches
        self.rows = self.sampler.global_positions(self.sampler.position, self.local_batch, self.info.device)
        self.sampler.advance(self.local_batch)
        check_batch_ranges(labels, x if self.cache_schedule is not None else None, self.num_classes,
                           self.tok.vocab_size)
        schedule = self.schedule_for(step)
        x, labels = x.to(self.info.device, non_blocking=True), labels.to(self.info.device, non_blocking=True)
        if self.cache_schedule is not None:
            codes = select_scales(x.long(), self.cache_schedule, schedule, self.dataset.manifest["quant_mode"])
        else:
            with torch.no_grad():
                codes = torch.cat(self.tok.encode(x.float(), schedule), dim=1)
        return labels, codes, schedule

    def schedule_for(self, step: int) -> Schedule:
        """The same on every rank: derived from (seed, step) only."""
        if not self.cfg.random_schedules:
            return self.cfg.schedule
        return random_flexvar_schedule(random.Random(schedule_seed(self.seed, step)), last=self.cfg.schedule[-1])

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict, saved_world_size: int | None) -> None:
        """Continue where `state` stopped. Saved by another number of ranks, the shards
        differ and cannot be continued: the next epoch's order starts instead."""
        if saved_world_size != self.info.world_size:
            self.sampler.set_epoch(state["epoch"] + 1)
        else:
            self.sampler.load_state_dict(state)
        self._iter = None


def check_batch_ranges(labels: torch.Tensor, codes: torch.Tensor | None, num_classes: int, vocab: int) -> None:
    """On the host, before the batch moves to the device: labels in [0, num_classes) and
    cached codes in [0, vocab) (codes the tokenizer makes on the fly are valid by construction)."""
    labels = labels.numpy()  # host tensors: numpy reads them without dispatching .item()
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"a batch holds labels in [{labels.min()}, {labels.max()}] but the model "
                         f"has {num_classes} classes")
    codes = None if codes is None else codes.numpy()
    if codes is not None and codes.size and (codes.min() < 0 or codes.max() >= vocab):
        raise ValueError(f"a batch holds codes in [{codes.min()}, {codes.max()}] but the tokenizer "
                         f"has {vocab} codes (a cache from another tokenizer?)")


def select_scales(codes: torch.Tensor, cache_schedule: Sequence[int], schedule: Sequence[int],
                  quant_mode: str) -> torch.Tensor:
    """Pick the scales of `schedule` out of codes cached for `cache_schedule`. Only FlexVAR's
    scales are independent (a cache holding every side serves any schedule); VAR's residual
    codes are valid for the cached schedule alone."""
    cache_schedule, schedule = Schedule(cache_schedule, name="cache_schedule"), Schedule(schedule)
    if schedule == cache_schedule:
        return codes
    if quant_mode != "flexvar":
        raise ValueError(f"this cache holds VAR residual codes for {cache_schedule}; they cannot serve schedule "
                         f"{schedule} (train with --schedule matching the cache, without --random-schedules)")
    return codes.index_select(1, _device_token_index(cache_schedule, schedule, codes.device))


def _device_token_index(cache_schedule: Schedule, schedule: Schedule,
                        device: torch.device) -> torch.Tensor:
    """schedule_token_index on `device`, kept per schedule (random schedules number a few
    thousand, each a few KB) and copied once, pinned and non-blocking."""
    key = (cache_schedule, schedule, device)
    if key not in _TOKEN_INDEX:
        index = schedule_token_index(cache_schedule, schedule)
        _TOKEN_INDEX[key] = to_device_async(index, device)
    return _TOKEN_INDEX[key]


_TOKEN_INDEX: dict = {}
