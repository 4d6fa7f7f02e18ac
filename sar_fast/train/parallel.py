"""Everything distributed, in one place: process group, FSDP2 wrapping, collectives.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR; multi-node runs use torchrun's own
rendezvous. CUDA runs use NCCL, CPU runs gloo. The model is sharded with FSDP2
(`fully_shard` per block, then the root) under a mixed-precision policy whose gradient
reduction stays in fp32, on a flat mesh or, with --replicas R, an HSDP mesh (R replicas,
each sharded over world/R ranks: one node each, so the all-gathers stay inside a node).
No other module opens or closes a process group or a device mesh, and each private torch
API the trainer needs sits in one function here (or in memory.py) that says why no public
one does it and checks for it (tests/test_torch_api_audit.py).

Communication per optimiser step (the --reshard policy; a SAR step runs three forwards,
TF, null-class prefix and student, and one backward through two of them):
  'step': every FSDP unit is all-gathered once per step and kept through all forwards,
          micro-batches and the backward; gradients accumulate unsharded and are
          reduce-scattered once, after the last micro-batch (`begin_step` /
          `reduce_gradients`). Costs the unsharded weights + fp32 gradients of the whole
          model per rank (as DDP), saves ~4 all-gathers and 1 reduce-scatter per block.
  'pass': FSDP's default: reshard after each forward and backward (least memory; the
          blocks are gathered again for every pass, ~5 all-gathers + 2 reduce-scatters
          per block per step).
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import os
import sys
import types
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..cli import resolve_device


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", timeout_s: float = 1800) -> DistInfo:
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


def ensure_process_group(info: DistInfo) -> None:
    """A 1-rank group in this process when none exists (plain `python -m sar_fast.train`), so
    that one code path (FSDP2 on a mesh) serves 1..N ranks."""
    if dist.is_initialized():
        return
    if info.world_size != 1:
        raise RuntimeError(f"{info.world_size} ranks but no process group: call init_distributed first")
    dist.init_process_group("gloo" if info.device.type == "cpu" else "nccl",
                            store=dist.HashStore(), rank=0, world_size=1)


def new_gloo_group():
    """A second group of all ranks on gloo (collective: every rank calls it), or None without a
    process group: host-side work in a background thread (the asynchronous checkpoint writer)
    then never shares a communicator with the training step's collectives."""
    if not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo")


@contextlib.contextmanager
def local_world(world_size: int, fake: bool = True):
    """A process group in this process only, closed on exit: with `fake`, torch's fake group
    of `world_size` ranks (this process is rank 0; collectives return without communicating,
    for the memory estimate), else a real 1-rank gloo group."""
    if dist.is_initialized():
        raise RuntimeError("a local process group needs a process without one (it opens and closes its own)")
    if fake:
        _register_fake_backend()
        dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=world_size)
    else:
        if world_size != 1:
            raise ValueError(f"a real local group has 1 rank, got world_size={world_size}")
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _register_fake_backend() -> None:
    """Torch's "fake" c10d backend is registered only by importing a module of its test
    utilities (torch 2.11 and 2.14 alike): no public module registers it. Fenced here, with a
    clear error if a release moves it."""
    try:
        import torch.testing._internal.distributed.fake_pg  # noqa: F401 - registers the backend
    except ImportError as e:
        raise RuntimeError(f"torch {torch.__version__} has no fake process group "
                           "(torch.testing._internal.distributed.fake_pg); the memory estimate needs one") from e


def shutdown(clean: bool = True) -> None:
    """Leave the process group. After a normal run every rank first meets at a barrier:
    a rank that tears gloo down while another still finishes its last writes can abort
    the other ("terminate called without an active exception")."""
    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def exit_process(code: int = 0) -> None:
    """End a torchrun worker after `shutdown`: Python's exit handlers run and the streams are
    flushed, but not the interpreter's teardown nor C++ static destructors. There, with no Python
    frame left, about one 4-rank gloo run in 15 on 2 busy cores aborted after every file was
    written ("terminate called without an active exception": a joinable std::thread destroyed),
    and the launcher then reports the whole run failed."""
    import atexit
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def set_collective_timeout(seconds: float) -> None:
    """Shorten (or lengthen) the default group's timeout: the first step keeps the long
    start-up one (compile, warm-up, loading), later steps fail fast on a hung rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        timeout = datetime.timedelta(seconds=seconds)
        if hasattr(dist, "set_timeout"):  # public from torch 2.14
            dist.set_timeout(timeout)
        else:
            _set_timeout_before_2_14(timeout)


def _set_timeout_before_2_14(timeout: datetime.timedelta) -> None:
    """Torch 2.11 (through 2.13) can change a live group's timeout only with a private
    function; without it the group keeps the start-up timeout (a hung rank is then found
    later, not never), said once."""
    try:
        from torch.distributed.distributed_c10d import _set_pg_timeout
    except ImportError:
        warnings.warn(f"torch {torch.__version__} cannot change a process group's timeout: "
                      "--collective-timeout is not applied (the --startup-timeout stays)", RuntimeWarning,
                      stacklevel=3)
        return
    _set_pg_timeout(timeout, None)


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` on every rank (one decision, e.g. which checkpoint to resume)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (one agreement, e.g. whether any rank failed to read)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


RESHARD_POLICIES = ("step", "pass")


def make_mesh(info: DistInfo, replicas: int = 1):
    """A flat FSDP mesh, or an HSDP one: `replicas` groups (nodes) of world/replicas ranks;
    parameters are sharded within a group and replicated across groups."""
    from torch.distributed.device_mesh import init_device_mesh
    if replicas < 1 or info.world_size % replicas:
        raise ValueError(f"--replicas {replicas} must be >= 1 and divide the {info.world_size} ranks")
    if replicas == 1:
        return init_device_mesh(info.device.type, (info.world_size,))
    return init_device_mesh(info.device.type, (replicas, info.world_size // replicas),
                            mesh_dim_names=("replicate", "shard"))


def shard_model(model: nn.Module, info: DistInfo, precision: str = "bf16",
                activation_checkpointing: bool = False, compile_blocks: bool = False,
                reshard: str = "pass", replicas: int = 1) -> nn.Module:
    """FSDP2: fully_shard every transformer block, then the root; optional activation
    checkpointing and torch.compile per block. Returns the (same) module, now sharded.
    `reshard`: the communication policy (module docstring); the root is never resharded
    after forward (its weights are needed again at once). `replicas` > 1: HSDP mesh.

    Also on a single process, so one code path serves 1..N ranks (a 1-rank mesh).
    The root's extra entry points (forward_student, generate) are registered as FSDP
    forward methods so they gather the root's weights like forward does.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    if not dist.is_initialized():
        raise RuntimeError("shard_model needs an initialised process group (run under torchrun)")
    if reshard not in RESHARD_POLICIES:
        raise ValueError(f"reshard must be one of {RESHARD_POLICIES}, got {reshard!r}")
    mesh = make_mesh(info, replicas)
    # cast_forward_inputs off: the fp32 residual stream reaches the blocks in fp32 and stays
    # fp32 (as in the original models under autocast); the blocks cast GEMM operands to bf16
    mp = MixedPrecisionPolicy(param_dtype=PRECISIONS[precision], reduce_dtype=torch.float32,
                              cast_forward_inputs=False)
    for block in model.blocks:
        if activation_checkpointing:
            recompute_in_backward(block)
        if compile_blocks:
            compile_block(block)
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard == "pass")
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    for name in ("forward_student", "generate"):
        register_fsdp_forward_method(model, name)
    model._sar_reshard_policy = reshard
    if reshard == "step":
        for unit in fsdp_units(model):
            unit.set_reshard_after_backward(False, recurse=False)
        model._sar_reduce_now = reduce_now_works(mesh, mp, info.device)
    return model


def recompute_in_backward(block: nn.Module) -> None:
    """Activation checkpointing of one block with the public torch.utils.checkpoint
    (non-reentrant, the RNG state replayed): its forward keeps no activations and runs again
    in the backward. The block stays the same module (same parameter names, so checkpoints
    and exports keep their keys), and the recomputation calls the block's own forward, not
    the module call, so FSDP's hooks (added later, on the module) gather it once per pass."""
    block.forward = types.MethodType(_checkpointed_forward, block)


def _checkpointed_forward(block: nn.Module, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint
    return checkpoint(type(block).forward, block, *args, use_reentrant=False, **kwargs)


def fsdp_units(model: nn.Module) -> list:
    """The FSDP-wrapped modules in module order: the root first, then the blocks."""
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


RECOMPILE_LIMIT = 32  # graphs per block's code before dynamo falls back to eager (its default: 8)


def compile_block(block: nn.Module, backend: str = "inductor") -> None:
    """torch.compile one transformer block. A training step needs 8 graphs whatever the
    schedule (static first call / dynamic lengths x grad on/off x drop-path on/off;
    tests/test_torch_compile.py), exactly dynamo's default limit, after which it would run
    the block eagerly for the rest of the run, saying so once in a log line; the end-of-run
    sample grids (eval mode, KV cache) need more. So the limit is raised for the blocks.
    Not dynamic=True from the first call: the attention then graph-breaks (16 graphs)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    block.compile(backend=backend)


def begin_step(model: nn.Module) -> None:
    """Before a step's first forward. 'step' policy: no unit reduces its gradient in the
    backward (they accumulate unsharded until `reduce_gradients`, or, where FSDP's internals
    failed the start-up probe, until the last micro-batch's backward)."""
    if getattr(model, "_sar_reshard_policy", "pass") == "step":
        for unit in fsdp_units(model):
            unit.set_requires_gradient_sync(False, recurse=False)


def set_micro_batch(model: nn.Module, last: bool) -> None:
    """Gradient sync only in the last micro-batch's backward (FSDP's no_sync): the 'pass'
    policy, and the 'step' policy's public fallback."""
    policy = getattr(model, "_sar_reshard_policy", "pass")
    if policy == "pass" or (policy == "step" and not getattr(model, "_sar_reduce_now", False)):
        model.set_requires_gradient_sync(last)


def reduce_gradients(model: nn.Module) -> None:
    """After the step's last backward. 'step' policy: one reduce-scatter (and, under HSDP,
    one all-reduce across replicas) per unit of the gradients accumulated over all passes
    and micro-batches (`_reduce_now`), then free the gathered weights so the next step
    gathers the updated ones. Under the public fallback the last micro-batch's backward has
    already reduced (up to once per pass through a unit) and only the weights are freed."""
    if getattr(model, "_sar_reshard_policy", "pass") != "step":
        return
    if getattr(model, "_sar_reduce_now", False):
        _reduce_now(fsdp_units(model))
    reshard_all(model)


def _reduce_now(units: list) -> None:
    """The one place that drives FSDP2 internals: FSDP2 has no public call for "reduce the
    accumulated gradients now". Runs each parameter group's post-backward with reduction on
    (what a synced backward's hook runs), then what FSDP's end-of-backward callback runs.
    The internals differ by release: one optional `_fsdp_param_group` per state and one
    `reduce_scatter_state` in torch 2.11; lists of both (`_fsdp_param_groups`,
    `reduce_scatter_states`) in 2.14. `reduce_now_works` probes it at start-up."""
    states = [unit._get_fsdp_state() for unit in units]
    groups = []
    for state in reversed(states):  # the backward's order: blocks last to first, root last
        if hasattr(state, "_fsdp_param_groups"):
            groups += state._fsdp_param_groups
        elif state._fsdp_param_group is not None:
            groups.append(state._fsdp_param_group)
    for g in groups:
        g.reduce_grads = g.all_reduce_grads = True  # what set_requires_gradient_sync(True) sets
        g.post_backward()
    for g in groups:
        g.finalize_backward()
    comm_ctx = states[0]._comm_ctx
    if hasattr(comm_ctx, "reduce_scatter_states"):
        pending = list(comm_ctx.reduce_scatter_states)
        comm_ctx.reduce_scatter_states.clear()
    else:
        pending = [comm_ctx.reduce_scatter_state] if comm_ctx.reduce_scatter_state is not None else []
        comm_ctx.reduce_scatter_state = None
    for rs_state in pending:  # the compute stream may reuse the reduce-scatter inputs only after them
        if rs_state.event is not None:
            torch.accelerator.current_stream().wait_event(rs_state.event)


_PROBED: dict[tuple, bool] = {}


def reduce_now_works(mesh, mp_policy, device: torch.device) -> bool:
    """Whether the 'step' policy may use `_reduce_now` (probed once per process and kind of
    group); if not, it falls back to FSDP2's public controls with a warning."""
    key = (dist.get_backend(), device.type, mesh.ndim, mp_policy.param_dtype)
    if key not in _PROBED:
        problem = _probe_reduce_now(mesh, mp_policy, device, check_values=key[0] != "fake")
        if problem is not None:
            warnings.warn(f"--reshard step: FSDP2's internals failed the start-up probe on torch "
                          f"{torch.__version__} ({problem}); falling back to its public gradient sync in "
                          f"the last micro-batch's backward: the same gradients, but up to one reduce-scatter "
                          f"per pass through each block instead of one per step", RuntimeWarning, stacklevel=3)
        _PROBED[key] = problem is None
    return _PROBED[key]


def _probe_reduce_now(mesh, mp_policy, device: torch.device, check_values: bool = True) -> str | None:
    """Why `_reduce_now` cannot be trusted here, or None. A 2-layer model sharded as the 'step'
    policy shards it, two steps of (two micro-batches, then one) with two forwards per
    backward and sync off, each ended by `_reduce_now`: every gradient must equal a plain
    copy's (all ranks feed the same inputs, so the rank average is that gradient). All ranks
    reach the same verdict (one all-reduce). A fake process group (the memory estimate)
    carries no values: there only the control flow runs."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    gen = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")  # explicit: the caller may be inside a torch.device("meta") context
    plain = nn.Sequential(nn.Linear(8, 8, device=cpu), nn.Linear(8, 4, device=cpu))
    with torch.no_grad():
        for p in plain.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device=cpu))
    inputs = [torch.randn(3, 8, generator=gen, device=cpu).to(device) for _ in range(3)]
    plain = plain.to(device)
    sharded = copy.deepcopy(plain)
    # inputs cast to the parameters' dtype (the probe's layers do not cast themselves)
    mp = MixedPrecisionPolicy(param_dtype=mp_policy.param_dtype, reduce_dtype=mp_policy.reduce_dtype)
    for layer in sharded:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(sharded, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    units = fsdp_units(sharded)
    tolerance = 1e-5 if mp_policy.param_dtype in (None, torch.float32) else 5e-2
    problem = None
    try:
        for unit in units:
            unit.set_reshard_after_backward(False, recurse=False)
        for micro_batches in ((inputs[0], inputs[1]), (inputs[2],)):
            for unit in units:
                unit.set_requires_gradient_sync(False, recurse=False)
            for x in micro_batches:
                for net in (sharded, plain):
                    (net(x).float().square().mean() + net(2 * x).float().mean()).backward()
            _reduce_now(units)
            for unit in units:
                unit.reshard()
            for (name, p), q in zip(sharded.named_parameters(), plain.parameters()):
                if p.grad is None:
                    raise RuntimeError(f"no gradient for {name} after the reduction")
                got = p.grad.full_tensor().float()
                if check_values and (got - q.grad).norm() > tolerance * q.grad.norm():
                    raise RuntimeError(f"{name}: reduced gradient differs from the plain model's")
            sharded.zero_grad(set_to_none=True)
            plain.zero_grad(set_to_none=True)
    except Exception as e:  # noqa: BLE001 - any failure of the internals is the verdict
        problem = f"{type(e).__name__}: {e}"
    verdict = torch.tensor([0.0 if problem is None else 1.0], device=device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
    if problem is None and check_values and verdict.item() > 0:
        problem = "the probe failed on another rank"
    return problem


def reshard_all(model: nn.Module) -> None:
    """Free every gathered weight (after a step, or after sampling under the 'step' policy)."""
    for unit in fsdp_units(model):
        unit.reshard()


def load_full_state(model: nn.Module, full_state: dict, device: torch.device) -> None:
    """Fill a model sharded on the meta device from rank 0's full state dict: storage is
    allocated for this rank's shards only, and rank 0 broadcasts the weights into them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True,
                                                                     broadcast_from_rank0=True))


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global grad norm over all shards (DTensor-aware), clipped to max_norm if > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm
