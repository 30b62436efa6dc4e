"""The errors a user can fix, and `run_cli`, the rule every command follows for them: one line
naming the problem and the fix, never a traceback. It imports only the standard library, so any
module can use it without pulling in jax or torch (the conversion commands import it first)."""
from __future__ import annotations

import errno
import shlex
import signal
import sys


class ConfigError(ValueError):
    """A configuration that cannot describe a supported model or run; the message says what to fix."""


class RunError(ValueError):
    """A run that cannot proceed as configured; the message says what to do."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file and the fix."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped a command after its finished work was saved; the message says
    where it stopped and how to resume."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# Mistakes a user can fix (bad path, wrong files, existing output): one line, no traceback.
USER_ERRORS = (CheckpointError, ConfigError, FileNotFoundError, FileExistsError)


def user_error_message(e: BaseException, user_errors=USER_ERRORS) -> str | None:
    """One line for a mistake or condition the user can fix; None for a bug (let it raise)."""
    if isinstance(e, user_errors):
        return " ".join(str(e).split())
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device holding {e.filename or 'the output'}; free some space and rerun "
                "(finished files are intact, nothing half-written was left)")
    return None


def run_cli(main, argv=None, user_errors=USER_ERRORS, *, interrupt_line: bool = False) -> int:
    """Run a command-line `main(argv)`; user errors print `error: ...` on stderr and exit 2, an
    interruption prints `interrupted: ...` and exits 130 (Ctrl-C, SIGINT) or 143 (SIGTERM). A
    `main` that returns an exit code has it returned. A Ctrl-C (KeyboardInterrupt) exits 130, with
    the line only where `interrupt_line` says so: a stage process leaves it to its ledger, which
    says where the run stopped and how to resume."""
    try:
        code = main(argv)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if interrupt_line:  # the commands write their outputs under temporary names, renamed when complete
            print(f"interrupted: {shlex.join(sys.orig_argv)} stopped before it finished; nothing half-written "
                  "was left (outputs appear only when complete): rerun it to start again", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as e:
        message = user_error_message(e, user_errors)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0
