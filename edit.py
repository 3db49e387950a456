#!/usr/bin/env python
"""``python edit.py [group=option ...] [key=value ...]`` = ``massedit edit ...`` (see ``massedit edit --help``)."""
import sys

from massedit.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("edit"))
