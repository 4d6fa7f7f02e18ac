"""--compile with random schedules: the schedule reaches the compiled blocks as tensors
(ops.ScaleLayout), so a run over many schedules compiles a handful of graphs instead of
one per schedule (which would hit dynamo's recompile limit and silently fall back to eager)."""
import random

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from sar_fast import ops
from sar_fast.train import parallel
from sar_fast.models import ScaleAR, preset_config
from sar_fast.sar import SARConfig, sar_step

MAX_GRAPHS = 8  # static first call, dynamic lengths, +/- grad, +/- drop-path: a fixed few, not one per schedule


def _random_schedule(rng: random.Random) -> tuple[int, ...]:
    return (1,) + tuple(sorted(rng.sample(range(2, 8), rng.randint(1, 4))))


def test_thirty_steps_of_random_schedules_compile_a_few_graphs():
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = ScaleAR(preset_config("flexvar-tiny", depth=2, drop_path_rate=0.2)).train()
    for block in model.blocks:
        parallel.compile_block(block, backend="eager")  # the trainer's call; dynamo's guards are what is tested
    codebook = torch.nn.functional.normalize(torch.randn(model.vocab_size, model.code_dim), dim=-1)
    objective = SARConfig(objective="sar", transitions="random", sampling="cfg", top_k=0, top_p=0.9)
    rng, schedules = random.Random(0), set()
    with ops.use_backend("reference"):
        for step in range(30):
            schedule = _random_schedule(rng)
            schedules.add(schedule)
            L = sum(s * s for s in schedule)
            out = sar_step(model, torch.randint(0, 10, (2,)), torch.randint(0, model.vocab_size, (2, L)), schedule,
                           codebook, objective, step=step)
            out.loss.backward()
    assert len(schedules) >= 20
    graphs = counters["stats"]["unique_graphs"]
    assert 0 < graphs <= MAX_GRAPHS, (graphs, len(schedules))
    assert counters["frames"]["ok"] == counters["frames"]["total"]  # nothing fell back to eager
    # the trainer's limit leaves room for the eval-mode / KV-cache graphs of sample grids
    assert torch._dynamo.config.recompile_limit >= parallel.RECOMPILE_LIMIT > MAX_GRAPHS

