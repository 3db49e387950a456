"""The one base class of errors caused by the user's input (config, request file, data, model name).

Every such error names what is wrong (file, record, field, config key); the command line prints
``error: <message>`` and exits with status 2 without a traceback. Anything else is a bug: exit 1 with the
traceback (also in the run's ``run.log``).
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad user input; the message says which file / record / field / config key and what to do."""
