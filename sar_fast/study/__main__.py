"""`python -m sar_fast.study`: see sar_fast.study."""
from ..cli import run_main
from .runner import main

run_main(main)
