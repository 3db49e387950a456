"""Shared CLI plumbing for edit.py / train.py / stats.py: argument handling, clean errors, exit codes."""
from __future__ import annotations

import logging
import sys
from typing import Callable, Sequence

from massedit.config import ConfigError

log = logging.getLogger("massedit")

USAGE = """usage: python {prog} [group=option ...] [key=value ...] [+new.key=value ...]

Config groups (configs/<group>/<option>.yaml): {groups}
Examples:
  python {prog}
  python {prog} method=rome data=counterfact data.num_edits=100 model.dtype=bfloat16
Print the composed config without running: python {prog} --cfg
"""


def run_cli(entry: str, prog: str, main: Callable, argv: Sequence[str] | None = None) -> int:
    """Compose the config, run ``main(cfg)``, and turn known user errors into messages + exit codes.

    Exit codes: 0 ok, 2 bad input (config, request file, missing model), 1 unexpected failure.
    """
    from massedit.config import compose, groups, to_yaml
    from massedit.core.models import ModelNotAvailableError
    from massedit.data.requests import RequestValidationError
    from massedit.methods import UnknownMethodError

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE.format(prog=prog, groups=", ".join(groups())))
        return 0
    # W&B agents pass `--key=value` (their default `${args}`); accept it as `key=value`
    argv = [a[2:] if a.startswith("--") and "=" in a else a for a in argv]
    show_cfg = "--cfg" in argv
    argv = [a for a in argv if a != "--cfg"]
    try:
        cfg = compose(entry, argv)
        if show_cfg:
            print(to_yaml(cfg))
            return 0
        main(cfg)
        return 0
    except (ConfigError, RequestValidationError, FileNotFoundError, ModelNotAvailableError, UnknownMethodError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2
