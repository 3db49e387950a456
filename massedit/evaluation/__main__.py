"""``python -m massedit.evaluation [group=option ...] [key=value ...]``: evaluation only (= ``edit.py mode=eval``).

Composes the ``edit`` config (same groups and overrides as edit.py), sets up the run directory and logger, and
evaluates the model as loaded, or before/after a saved delta file with ``deltas=PATH``.
Example: ``python -m massedit.evaluation data=counterfact data.num_edits=200 eval.generation=false logger=none``
"""
from __future__ import annotations

import sys


def main(cfg) -> None:
    from massedit.evaluation.api import run_eval_only
    from massedit.runs import setup_run

    run = setup_run(cfg)
    try:
        run_eval_only(cfg, run)
    finally:
        run.finish()


if __name__ == "__main__":
    from massedit.cli import run_cli

    sys.exit(run_cli("edit", "python -m massedit.evaluation", main, [a for a in sys.argv[1:]] + ["mode=eval"]))
