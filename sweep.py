#!/usr/bin/env python
"""Run a W&B sweep file offline: grid or random search, trial after trial (or one per device), resumable.

    python sweep.py configs/sweeps/ftw_weight_decay.yaml
    python sweep.py configs/sweeps/ftw_weight_decay.yaml --set data.num_edits=50 --out outputs/sweeps/wd
    python sweep.py configs/sweeps/ftw_weight_decay.yaml --dry-run      # print the trial commands
    python sweep.py --help

With a W&B server the same file runs with `wandb sweep <file>` + `wandb agent <sweep id>`.
"""
from __future__ import annotations

import sys

if __name__ == "__main__":
    from massedit.sweeps import main

    sys.exit(main())
