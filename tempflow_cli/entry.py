"""The ``tempflow`` console entry point: signals are handled from the first instant.

Importing the command module takes a moment (its option lists are read from the stages' source); a
Ctrl-C or SIGTERM then must end with one line, like one that arrives while a stage runs, not a
traceback. So the command module is imported inside :func:`main`, after the handlers are set: an
import inside a function for start-up time, as everywhere in this package.
"""

from __future__ import annotations

import signal
import sys


def _stop(signum: int, frame: object) -> None:
    print("interrupted: nothing was written; run it again", file=sys.stderr)
    sys.exit(128 + signum)


def main() -> None:
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    from tempflow_cli.main import cli

    for sig, handler in previous.items():  # the command group installs its own while a stage runs
        signal.signal(sig, handler)
    cli(prog_name="tempflow")
