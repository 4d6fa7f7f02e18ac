"""Run under torchrun by tests/test_resume_safety.py: builds the trainer from the flags after
`--`, then resumes each checkpoint folder named by --folders (a JSON list) through the
trainer's own `checkpointing.load_checkpoint`, one after the other, and writes (rank 0) to
--json what each rank got: "ok" or the error's type and message. Every folder is tried on
every rank, so a rank that went on while another failed would hang here (the test's
timeout) instead of passing."""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sar_fast.train import checkpointing, parallel
from sar_fast.train import trainer as train


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--folders", required=True)
    args, flags = ap.parse_known_args()
    flags = flags[1:] if flags[:1] == ["--"] else flags
    trainer = train.Trainer(train.parse_config(flags))
    results = {}
    for folder in json.loads(args.folders):
        try:
            checkpointing.load_checkpoint(folder, trainer.model, trainer.optimizer, trainer.info)
            results[folder] = "ok"
        except Exception as e:  # noqa: BLE001 - the probe reports whatever each rank raised
            results[folder] = f"{type(e).__name__}: {e}"
    every_rank = parallel.all_gather_object(results)
    if trainer.info.is_main:
        with open(args.json, "w") as f:
            json.dump(every_rank, f)
    parallel.shutdown(clean=True)


if __name__ == "__main__":
    main()
    parallel.exit_process(0)
