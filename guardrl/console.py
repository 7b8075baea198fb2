"""The `guardrl` console script.

It checks the command line and config files first (guardrl.preflight: standard library and PyYAML, about
0.3 s) and only then imports torch and Lightning (8-14 s on 2 cores) for the full parser and the run, so a
misspelt option or a missing file is reported at once. User errors raised later (a bad value, an unreadable
checkpoint, a full disk) print one short message instead of a traceback; GUARDRL_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import errno
import os
import sys

from guardrl.preflight import main_or_exit

DEBUG_VARIABLE = "GUARDRL_DEBUG"
# What a full disk, a read-only or unwritable log directory look like: the user's to fix, one line each.
USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT}


def version_line() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import guardrl

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"guardrl {guardrl.__version__} (torch {installed('torch')}, lightning {installed('lightning')})"


def console_main() -> None:
    """The `guardrl` console script: returns None, so a finished run exits 0 (setuptools' wrapper passes the
    return value to sys.exit, and a returned GuardRLCLI object would mean exit status 1)."""
    argv = sys.argv[1:]
    if argv in (["--version"], ["-V"]):
        print(version_line())
        return
    main_or_exit(argv)
    from guardrl.cli import main

    try:
        main()
    except (ValueError, FileNotFoundError, OSError) as error:
        user_error = (
            not isinstance(error, OSError)
            or isinstance(error, FileNotFoundError)
            or error.errno in USER_OS_ERRORS
        )
        if not user_error or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        sys.exit(short_error(error))


def short_error(error: BaseException) -> str:
    """What the console prints for a user error: the message (which names the option, the value and what is
    allowed) and where it was raised, instead of 12-80 traceback frames. Exit status 1 (sys.exit with a
    string); GUARDRL_DEBUG=1 shows the whole traceback."""
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    where = f" (raised at {os.path.relpath(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    return f"guardrl: error: {error}\n  {type(error).__name__}{where}; {DEBUG_VARIABLE}=1 shows the traceback"


if __name__ == "__main__":  # pragma: no cover
    console_main()
