#!/usr/bin/env python
"""massedit training job: FT-W (fine-tune one MLP layer with weight decay) or MEND (train the hypernetwork).

    python train.py method=ftw method.weight_decay=1e-3
    python train.py method=mend data=zsre_train
    python train.py --help
"""
from __future__ import annotations

import sys


def main(cfg) -> dict:
    from massedit.methods import trainer_entry
    from massedit.runs import setup_run

    run = setup_run(cfg)
    try:
        results = trainer_entry(cfg.method.name)(cfg, run)
        print(f"\nOutputs written to {run.dir}")
        return results
    finally:
        run.finish()


if __name__ == "__main__":
    from massedit.cli import run_cli

    sys.exit(run_cli("train", "train.py", main))
