"""Everything distributed, in one place: process group, FSDP2 wrapping, collectives.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR; multi-node runs use torchrun's own
rendezvous. CUDA runs use NCCL, CPU runs gloo. The model is sharded with FSDP2
(`fully_shard` per block, then the root) under a mixed-precision policy whose gradient
reduction stays in fp32 and that leaves the forward inputs' dtypes alone (see shard_model).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str | None = "auto") -> torch.device:
    """What a --device flag names: 'auto' (or None) is CUDA when available, else the CPU;
    a CUDA device must exist."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise RuntimeError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} was requested but no CUDA device is available")
    return dev


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Join the process group torchrun describes (or run alone when launched by plain python)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistInfo(rank, world, local_rank, dev)


def shutdown(clean: bool = True) -> None:
    """Leave the process group. After a normal run every rank first meets at a barrier:
    a rank that tears gloo down while another still finishes its last writes can abort
    the other ("terminate called without an active exception")."""
    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def shard_model(model: nn.Module, info: DistInfo, precision: str = "bf16",
                activation_checkpointing: bool = False, compile_blocks: bool = False,
                reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: fully_shard every transformer block, then the root; optional activation
    checkpointing and torch.compile per block. Returns the (same) module, now sharded.

    Also on a single process, so one code path serves 1..N ranks (a 1-rank mesh).
    The root's extra entry points (forward_student, generate) are registered as FSDP
    forward methods so they gather the root's weights like forward does.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    if not dist.is_initialized():
        raise RuntimeError("shard_model needs an initialised process group (run under torchrun)")
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    # cast_forward_inputs off: the fp32 residual stream reaches the blocks in fp32 and stays
    # fp32 (as in the original models under autocast); the blocks cast GEMM operands to bf16
    mp = MixedPrecisionPolicy(param_dtype=PRECISIONS[precision], reduce_dtype=torch.float32,
                              cast_forward_inputs=False)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        for i, block in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(block)
    for i, block in enumerate(model.blocks):
        if compile_blocks:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for name in ("forward_student", "generate"):
        register_fsdp_forward_method(model, name)
    return model


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global grad norm over all shards (DTensor-aware), clipped to max_norm if > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm
