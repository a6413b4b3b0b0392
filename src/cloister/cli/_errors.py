"""The one table from Cloister's errors to CLI exit codes, and the handler that applies it.

=========  ==========================================================
exit code  meaning
=========  ==========================================================
0          success (for verification commands: accepted)
1          refused: evidence, session, access, policy (an ``Error``)
2          usage error (bad flags, unreadable input file)
3          a backend (CAS, database, collateral service) is unavailable
4          integrity: a volume, store or log was tampered with or rolled back
=========  ==========================================================
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from cloister import errors

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTEGRITY = 4

_TABLE: tuple[tuple[type[errors.Error], int], ...] = (
    (errors.BackendUnavailable, EXIT_UNAVAILABLE),
    (errors.VolumeIntegrityError, EXIT_INTEGRITY),
    (errors.StoreError, EXIT_INTEGRITY),
    (errors.Error, EXIT_REFUSED),
)


def exit_code_for(exc: errors.Error) -> int:
    for cls, code in _TABLE:
        if isinstance(exc, cls):
            return code
    return EXIT_REFUSED


P = ParamSpec("P")
R = TypeVar("R")


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn Cloister errors into one line on stderr and the table's exit code."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except errors.Error as exc:
            print(f"cloister: error: {exc.message} [{exc.reason}]", file=sys.stderr)
            raise SystemExit(exit_code_for(exc)) from None

    return wrapper


def usage_error(message: str) -> SystemExit:
    print(f"cloister: usage error: {message}", file=sys.stderr)
    return SystemExit(EXIT_USAGE)
