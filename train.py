#!/usr/bin/env python
"""``python train.py [group=option ...] [key=value ...]`` = ``massedit train ...`` (see ``massedit train --help``)."""
import sys

from massedit.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("train"))
