"""`python -m sar_fast.train` / `torchrun -m sar_fast.train`: see sar_fast.train.trainer."""
from ..cli import run_main
from . import parallel
from .trainer import main

run_main(main)
parallel.exit_process(0)
