"""Exit codes, and how a command that stops on an error says so.

  0  ok: the outcome is below the --fail-on level (or there is none)
  1  the policy failed: the outcome reached --fail-on, or `compare` found a new flag
  2  usage, configuration or data error, found before any verdict
  3  the command stopped on an error: a bug, or the machine (the disk full, a store
     that cannot be written); no verdict. A run it was computing is marked ``failed``
     with the reason, keeps its finished chunks, and ``--resume`` continues it
130 interrupted (Ctrl-C); ``--resume`` continues the run

So in CI a crash never reads as a bias finding (1).
"""

from __future__ import annotations

import errno
import sys
import traceback
from collections.abc import Callable

EXIT_OK, EXIT_POLICY, EXIT_USAGE, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# OSErrors that come from the machine, not from a bug, with what to do about them.
MACHINE_ERRORS = {
    errno.ENOSPC: "the disk is full: free some space",
    errno.EDQUOT: "the disk quota is used up: free some space or raise the quota",
    errno.EROFS: "the file system is read-only: make it writable or use another store (--out)",
    errno.EACCES: "permission denied: make it writable for this user or use another store",
    errno.EPERM: "the operation is not permitted: check the folder's permissions",
}


def failed_run(error: BaseException):
    """The run folder an error stopped (``run_audit`` marks it), or None."""
    return getattr(error, "failed_run", None)


def _continue_note(error: BaseException) -> str:
    run = failed_run(error)
    if run is None:
        return ""
    return (
        f" The run {run} is marked failed and keeps its finished chunks; continue it with "
        "the same command and --resume."
    )


def describe(command: str, error: BaseException) -> str:
    """What to print when ``command`` stopped on ``error`` (no traceback for the
    machine's errors; a bug's says to report it)."""
    if isinstance(error, OSError) and error.errno in MACHINE_ERRORS:
        where = f" writing {error.filename}" if error.filename else ""
        return (
            f"bias-audit {command}: stopped{where}: {MACHINE_ERRORS[error.errno]}."
            + _continue_note(error)
        )
    return (
        f"bias-audit {command}: internal error: {type(error).__name__}: {error}."
        + _continue_note(error)
        + " This is a bug in bias-audit, not a verdict on the model: please report it "
        "with the traceback above."
    )


def guarded(command: str, handler: Callable[[], int]) -> int:
    """``handler()``'s exit code, or ``EXIT_ERROR`` with a clear message when it stops on
    an error (``EXIT_INTERRUPTED`` on Ctrl-C)."""
    try:
        return handler()
    except KeyboardInterrupt:
        print(
            f"bias-audit {command}: interrupted; a run it was computing continues with the "
            "same command and --resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except Exception as error:
        if not (isinstance(error, OSError) and error.errno in MACHINE_ERRORS):
            traceback.print_exc()
        print(describe(command, error), file=sys.stderr)
        return EXIT_ERROR
