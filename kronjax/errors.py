"""Errors a user fixes from the message alone; the CLIs print them in one line, no traceback.

A traceback tells a user that kronjax broke. For a bad setting, an unusable file or a busy
workdir it did not, and the message must say what to change; anything else keeps its traceback.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A setting, input file or workdir kronjax cannot use as given; the message says which."""
