"""How every command line ends: a failure prints one line, `--debug` shows the whole traceback instead.

    if __name__ == "__main__":
        run_main(main)

Errors a user can cause (a missing folder, a damaged checkpoint, a bad flag value, a malformed input file) are raised
as exceptions whose message names the value and what is allowed; at the command line that message is all a user
needs, so `run_main` prints it as `error: ...` on stderr and exits with status 1. `--debug` (anywhere among the
arguments; removed before `main` sees them) lets the exception propagate with its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

DEBUG_FLAG = "--debug"
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
# Their message says everything; for other exception types the type name is part of the story.
_SELF_EXPLAINING = (ValueError, TypeError, OSError)


def error_line(error: BaseException) -> str:
    """`error: <message>` for an exception (its type name first unless the message stands alone)."""
    message = str(error).strip() or type(error).__name__
    if not isinstance(error, _SELF_EXPLAINING) and message != type(error).__name__:
        message = f"{type(error).__name__}: {message}"
    return f"error: {message}"


def run_main(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
    """Runs `main(argv)` (default: the process's arguments); a raised exception becomes one `error:` line on stderr
    and exit status 1 (130 for Ctrl-C), unless `--debug` is among the arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args
    args = [a for a in args if a != DEBUG_FLAG]
    try:
        main(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as error:  # noqa: BLE001 - the one place every command's failure is reported
        if debug:
            raise
        print(f"{error_line(error)}  (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None
