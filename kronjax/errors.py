"""Errors a user fixes from the message alone; the CLIs print them in one line, no traceback.

A traceback tells a user that kronjax broke. For a bad setting, an unusable file or a busy
workdir it did not, and the message must say what to change; anything else keeps its traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

__all__ = ["UserError", "close_all", "debug_traceback", "exit_line", "os_reason"]


class UserError(ValueError):
    """A setting, input file or workdir kronjax cannot use as given; the message says which."""


def close_all(*closers: Callable[[], object], after_error: bool) -> None:
    """Run every closer, whatever the others do: the first error wins.

    After an error (`after_error`), a closer that fails too (a TensorBoard flush on the full
    disk that stopped the run) is logged at debug level only, so the error that ended the
    run stays the one line a user reads. Otherwise the first failure is raised once every
    closer has run."""
    first: BaseException | None = None
    for close in closers:
        try:
            close()
        except Exception as e:  # noqa: BLE001 - reported below or kept at debug level
            if after_error:
                logging.getLogger("kronjax").debug("cleanup after the error failed too: %s",
                                                   e, exc_info=e)
            elif first is None:
                first = e
    if first is not None:
        raise first


def debug_traceback(e: BaseException) -> None:
    """Print e's traceback on stderr at --log-level debug only: otherwise a user's one line
    stays alone."""
    if logging.getLogger("kronjax").isEnabledFor(logging.DEBUG):
        import traceback

        traceback.print_exception(e)


def exit_line(prog: str, e: BaseException) -> str:
    """The line a CLI ends with for a UserError (exit code 2): `PROG: error: MESSAGE`; the
    traceback too, first, at --log-level debug."""
    debug_traceback(e)
    return f"{prog}: error: {e}\n"


def os_reason(e: BaseException) -> str:
    """An OSError as a user reads it: "no space left on device (ENOSPC)"; else its text."""
    code = getattr(e, "errno", None)
    if not code:
        return str(e) or type(e).__name__
    import errno
    import os

    text = os.strerror(code)
    return f"{text[:1].lower()}{text[1:]} ({errno.errorcode.get(code, code)})"
