"""The ``massedit`` command (also ``python -m massedit``, and the top-level ``edit.py``/``train.py``/``stats.py``/
``sweep.py`` scripts of a checkout).

    massedit edit  [group=option ...] [key=value ...]     edit a model, evaluate before and after (the main job)
    massedit train [group=option ...] [key=value ...]     FT-W fine-tuning or MEND hypernetwork training
    massedit eval  [group=option ...] [key=value ...]     evaluation only (= edit mode=eval), e.g. deltas=PATH
    massedit stats [group=option ...] [key=value ...]     precompute / import / export second-moment statistics
    massedit sweep SWEEP.yaml [--out DIR] [--set k=v ...]  run a W&B sweep file offline (Optuna)
    massedit reproduce {scaling,table2} [key=value ...]   the paper's scaling curves / Table 2 (resumable)

Options of edit/train/eval/stats: ``--cfg`` prints the composed config and exits; ``--config-dir DIR`` adds a
directory of config files in front of the package's (also ``MASSEDIT_CONFIG_DIR``). Exit codes: 0 ok, 2 bad input
(config, request file, data, model, a refused edit; one ``error:`` line, nothing written when found by the
up-front validation), 1 unexpected failure (a bug; traceback on stderr and in ``run.log``), 130 / 143 stopped by
SIGINT / SIGTERM.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable, Sequence

log = logging.getLogger("massedit")

COMMANDS = ("edit", "train", "eval", "stats", "sweep", "reproduce")

USAGE = """usage: massedit {{edit,train,eval,stats}} [group=option ...] [key=value ...] [--cfg] [--config-dir DIR]
       massedit sweep SWEEP.yaml [options]      (massedit sweep --help)
       massedit reproduce {{scaling,table2}} output_dir=DIR data.dev=FILE [key=value ...]   (--help)

  edit    edit a model and evaluate it before and after (default: MEMIT on SmolLM2, built-in requests)
  train   train FT-W on edit requests, or a MEND hypernetwork
  eval    evaluate only (the model as loaded, or before/after deltas=PATH)
  stats   precompute second-moment statistics (stats.layers=[...], stats.export_dir=DIR)
  sweep   run a W&B sweep file offline on Optuna (grid / random / bayes=TPE), resumable
  reproduce  the paper's scaling curves (scaling) or Table 2 (table2) as edit jobs, resumable

Config groups (configs/<group>/<option>.yaml): {groups}
Examples:
  massedit edit
  massedit edit method=rome data=counterfact data.path=counterfact.json data.num_edits=100 model.dtype=bfloat16
  massedit train method=ftw method.weight_decay=1e-3 data.path=counterfact.json
  massedit edit --cfg                        print the composed config
"""


def _known_errors() -> tuple[type[BaseException], ...]:
    from massedit.core.errors import InputError

    return (InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError, UnicodeDecodeError)


def _job_entry(command: str) -> str:
    return {"edit": "edit", "eval": "eval", "stats": "edit", "train": "train"}[command]


def _runner(command: str) -> Callable:
    if command == "reproduce":
        from massedit.tasks.reproduce import run_reproduce

        return lambda job: run_reproduce(*job)
    if command in ("edit", "eval"):
        from massedit.tasks.edit import edit_job

        return edit_job
    if command == "train":
        from massedit.tasks.train import train_job

        return train_job
    from massedit.tasks.stats import stats_job

    return stats_job


def _pop_option(argv: list[str], name: str) -> list[str]:
    """Remove ``--name VALUE`` / ``--name=VALUE`` occurrences from ``argv``; return the values."""
    values, out, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == name:
            if i + 1 >= len(argv):
                raise SystemExit(f"error: {name} needs a value")
            values.append(argv[i + 1])
            i += 2
            continue
        if a.startswith(name + "="):
            values.append(a.split("=", 1)[1])
        else:
            out.append(a)
        i += 1
    argv[:] = out
    return values


def run_command(command: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run one subcommand with its arguments; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if command == "sweep":
        from massedit.tasks.sweep import main as sweep_main

        return sweep_main(argv)
    if command == "reproduce":
        try:
            job = _reproduce_args(argv)
            return 0 if job is None else _run_job(command, job)
        except _known_errors() as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    from massedit.tasks.config import compose, groups, to_yaml

    if any(a in ("-h", "--help") for a in argv):
        print(USAGE.format(groups=", ".join(groups())))
        return 0
    try:
        config_dirs = _pop_option(argv, "--config-dir")
        # W&B agents pass `--key=value` (their default `${args}`); accept it as `key=value`
        argv = [a[2:] if a.startswith("--") and "=" in a else a for a in argv]
        show_cfg = "--cfg" in argv
        argv = [a for a in argv if a != "--cfg"]
        job = compose(_job_entry(command), argv, config_dirs)
        if show_cfg:
            print(to_yaml(job))
            return 0
        return _run_job(command, job)
    except _known_errors() as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except _rank_failed() as e:  # another rank failed (its own message came first); this one did its part
        print(f"error: {e}", file=sys.stderr)
        return 1


def _reproduce_args(argv: list[str]):
    """``(config, show_cfg)`` of ``massedit reproduce``; None after ``--help``."""
    from massedit.tasks.reproduce import parse_args

    cfg, show = parse_args(argv)
    return None if cfg is None else (cfg, show)


def _rank_failed() -> type[BaseException]:
    from massedit.trainer import RankFailedError

    return RankFailedError


def _run_job(command: str, job) -> int:
    """Run a composed job: user errors propagate (exit 2); SIGINT/SIGTERM stop it (exit 130/143, one line);
    any other exception is a bug: its traceback (also in the run's ``run.log``) and exit 1."""
    import traceback

    from massedit.tasks.runs import Interrupted, received_signal, stop_on_signals

    try:
        with stop_on_signals():
            _runner(command)(job)
        return 0
    except _known_errors():
        raise
    except (Interrupted, KeyboardInterrupt, SystemExit) as e:
        sig = received_signal() or getattr(e, "signum", None) or (2 if isinstance(e, KeyboardInterrupt) else None)
        if sig is None:  # a plain sys.exit() from below
            raise
        import signal

        print(f"error: interrupted by {signal.Signals(sig).name}: files written so far are complete (every write is "
              f"atomic); rerun with resume=true to continue", file=sys.stderr)
        return 128 + int(sig)
    except Exception as e:  # a bug (user errors were re-raised above)
        traceback.print_exc()
        print(f"error: unexpected internal error ({type(e).__name__}: {e}); this is a bug in massedit — the "
              f"traceback is above (and in run.log when the run directory was created)", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """``massedit COMMAND ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        from massedit.tasks.config import groups

        print(USAGE.format(groups=", ".join(groups())))
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from massedit import __version__

        print(f"massedit {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; choose one of {', '.join(COMMANDS)} (massedit --help)", file=sys.stderr)
        return 2
    return run_command(command, rest)


if __name__ == "__main__":
    sys.exit(main())
