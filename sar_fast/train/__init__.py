"""The trainer: `torchrun -m sar_fast.train` (trainer.py) and what only it uses: flags and
presets (config.py), model and optimiser building (build.py), FSDP2 and process groups
(parallel.py), checkpoints (checkpointing.py), memory estimates (memory.py), logs and FLOPs."""
from .trainer import Trainer, main, param_groups, parse_config

__all__ = ["Trainer", "main", "param_groups", "parse_config"]
