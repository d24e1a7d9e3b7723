"""The ``hypermeta`` console script.

Loading torch, Optuna and pandas takes seconds. Ctrl-C in that time must not print a traceback (or
let torch abort in its C++ start-up), so until the command line is loaded an interrupt just ends
the process; nothing has been written yet.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> int:
    signal.signal(signal.SIGINT, _interrupted_while_loading)
    from hypermeta import _cli

    signal.signal(signal.SIGINT, signal.default_int_handler)
    return _cli.main()


def _interrupted_while_loading(signum, frame) -> None:
    sys.stderr.write("hypermeta: interrupted\n")
    sys.stderr.flush()
    os._exit(128 + signal.SIGINT)
