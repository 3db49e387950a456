#!/usr/bin/env python
"""``python sweep.py SWEEP.yaml [options]`` = ``massedit sweep ...`` (see ``massedit sweep --help``)."""
import sys

from massedit.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("sweep"))
