"""The error contract of the command-line tools (``mta-distill``, ``mta-prepare``, ``mta-eval``).

A mistake the user can fix — a config key, a file, the data, an option — is a :class:`UserError`
whose message says what is wrong, where (the config key, ``file:line``) and how to fix it. The
commands print it as one line, ``<prog>: error: <message>``, on stderr and exit with status 2
(argparse's convention for usage errors), without a traceback; ``--debug`` or ``MTA_DEBUG=1``
shows the traceback too. Library functions keep raising the usual ``ValueError``/``TypeError``;
``UserError`` is a ``ValueError``, so Python callers catch both alike.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

__all__ = ["EXIT_INTERRUPTED", "EXIT_USER_ERROR", "UserError", "debug_requested", "run_command"]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C

DEBUG_HELP = "show the traceback of an error (also MTA_DEBUG=1)"


class UserError(ValueError):
    """A mistake in what the user asked for; the message names it and says how to fix it."""


def debug_requested(flag: bool = False) -> bool:
    """``--debug`` given, or ``MTA_DEBUG`` set to anything but ``""``/``0``."""
    return flag or os.environ.get("MTA_DEBUG", "") not in ("", "0")


def run_command(prog: str, body: Callable[[], int], *, debug: bool = False) -> int:
    """Run a command's ``body`` under the contract: its exit status, 2 after a
    :class:`UserError` (one line on stderr), 130 after Ctrl-C. Any other exception propagates
    with its traceback: it is a bug or a failure of the machine, not a mistake to be fixed."""
    try:
        return body()
    except UserError as err:
        if debug_requested(debug):
            traceback.print_exc()
        message = " ".join(str(err).split())  # one line, whatever the message holds
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if debug_requested(debug):
            traceback.print_exc()
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
