"""`python -m sar_fast.memory`: the peak GPU memory of a training configuration (the
estimator is sar_fast.train.memory)."""
from .train.memory import main

if __name__ == "__main__":
    from .cli import run_main
    run_main(main)
