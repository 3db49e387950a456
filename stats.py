#!/usr/bin/env python
"""``python stats.py [group=option ...] [key=value ...]`` = ``massedit stats ...`` (see ``massedit stats --help``)."""
import sys

from massedit.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("stats"))
