"""``python -m massedit COMMAND ...`` (= the ``massedit`` command)."""
import sys

from massedit.cli import main

sys.exit(main())
