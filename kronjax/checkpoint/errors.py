"""What goes wrong with checkpoints, said in one line.

The exceptions a resume or a save raises (`UnreadableCheckpointError`, `CheckpointSaveError`
are UserErrors: the CLIs print them without a traceback), the resume-compatibility check,
`describe_failure` (an I/O failure's OS error, e.g. "no space left on device (ENOSPC)"), and
`quiet_orbax`, which mutes the tracebacks orbax logs for failures that reach kronjax anyway.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from kronjax.errors import UserError

__all__ = ["RESUME_KEYS", "CheckpointSaveError", "ChecksumMismatch", "IncompatibleCheckpointError",
           "NonFiniteCheckpoint", "NonFiniteStateError", "UnreadableCheckpointError",
           "nonfinite_summary", "as_json", "check_compatible", "describe_failure",
           "quiet_orbax"]

# What a checkpoint must agree with to be resumed (kronjax.run.run_meta writes them): the arm,
# the model's shapes, the tokenizer's vocabulary and the codec's byte rows.
RESUME_KEYS: tuple[str, ...] = ("arm", "model_shape", "tokenizer_fingerprint",
                                "vocab_fingerprint")
_MISSING = "<missing>"


class IncompatibleCheckpointError(UserError):
    """The checkpoint in a workdir was written by a run this config cannot resume."""


class UnreadableCheckpointError(UserError):
    """No checkpoint (or not the step asked for) can be restored; the message says why."""


class CheckpointSaveError(UserError):
    """A checkpoint could not be written (disk full, quota, permissions...)."""


class ChecksumMismatch(ValueError):
    """A restored array's checksums differ from those saved with it."""


class NonFiniteStateError(UserError, RuntimeError):
    """The state to be saved holds NaN or inf: it is not saved (the run has diverged)."""

    @classmethod
    def at(cls, step: int, what: str, saved: Sequence[int], directory: Any
           ) -> NonFiniteStateError:
        kept = (f"the last checkpoint (step {saved[-1]}) is kept" if saved else
                "no checkpoint has been saved yet")
        return cls(f"the state at step {step} holds {what}: the run diverged, and this step "
                   f"is not saved; {kept} in {directory}. Lower optim.peak_lr (or raise "
                   "optim.warmup_steps) and rerun.")


class NonFiniteCheckpoint(ValueError):
    """A restored step holds NaN or inf (written before kronjax checked before saving)."""


def nonfinite_summary(names: Sequence[str], total: int) -> str:
    """'NaN or inf in 3 of 16 arrays (['params']['w'], ...)'."""
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"NaN or inf in {len(names)} of {total} arrays ({shown})"


def as_json(value: Any) -> Any:
    """What `value` reads back as after a JSON round trip (tuples become lists)."""
    return json.loads(json.dumps(value))


def check_compatible(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    keys: Sequence[str] = RESUME_KEYS,
) -> None:
    """Raise `IncompatibleCheckpointError` naming every key where the runs differ.

    Values are compared as JSON (the form `saved` was stored in), so a tuple
    `model_shape` matches its saved list. A key absent from both is fine; absent
    from one side only is a mismatch.
    """
    diffs = []
    for key in keys:
        s = saved.get(key, _MISSING)
        c = as_json(current[key]) if key in current else _MISSING
        if s != c:
            diffs.append(f"  {key}: checkpoint has {s!r}, current config has {c!r}")
    if diffs:
        raise IncompatibleCheckpointError(
            "the checkpoint cannot be resumed with this config:\n"
            + "\n".join(diffs)
            + "\nUse a fresh --workdir for a new run, or rerun with the config that"
            " wrote this checkpoint."
        )


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)  # type: ignore
    return out


def describe_failure(e: BaseException, limit: int = 300) -> str:
    """One line for an I/O failure: the OS error where one is recorded (an OSError's errno,
    or tensorstore's `os_error_code=N`), e.g. "no space left on device (ENOSPC)"; otherwise
    the type and the first line of the message of the original error (the last cause in the
    chain: orbax wraps tensorstore's precise message in one that dumps a whole spec), cut at
    `limit` characters."""
    chain = _chain(e)
    for exc in chain:
        code = exc.errno if isinstance(exc, OSError) else None
        if not code and (m := re.search(r"os_error_code='?(\d+)", str(exc))):
            code = int(m.group(1))
        if code:
            return f"{os.strerror(code)[:1].lower()}{os.strerror(code)[1:]} " \
                   f"({errno.errorcode.get(code, code)})"
    root = chain[-1]
    text = (str(root).strip().splitlines() or [""])[0]
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(root).__name__}: {text}" if text else type(root).__name__


class _OrbaxTracebacks(logging.Filter):
    """Drops ERROR records with a traceback that come from orbax (a failed background save
    is logged four times over hundreds of lines, and asyncio adds "exception was never
    retrieved" for each of orbax's other writes when the process ends): the failure itself
    reaches `Checkpointer`, which reports it in one line. Kept with kronjax at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(_READ_ONLY_NOTES):  # kronjax asked for read-only
            return False
        if record.levelno < logging.ERROR:
            return True
        if logging.getLogger("kronjax").isEnabledFor(logging.DEBUG):
            return True
        if not record.exc_info:  # asyncio's notes on orbax's tasks left by a failed restore
            return not (record.name == "asyncio" and record.getMessage().startswith(
                ("Task was destroyed", "Task exception was never retrieved",
                 "Future exception was never retrieved")))
        tb = record.exc_info[2]
        where = [record.pathname] + [f.filename for f in traceback.extract_tb(tb)] if tb \
            else [record.pathname]
        return not (any("/orbax/" in w.replace(os.sep, "/") for w in where)
                    or "orbax" in record.getMessage())


_QUIET: list[bool] = []
# orbax's notes on read-only opening, and on a step a live trainer deleted while it was read
_READ_ONLY_NOTES = ("Given directory is read only", "CheckpointManagerOptions.read_only=True",
                    "Metadata file does not exist")


def quiet_orbax() -> None:
    """Install, once, the filter above on the absl (orbax logs through it) and asyncio
    loggers, and drop the "Event loop is closed" noise that tensorstore callbacks print after
    a failed restore."""
    if _QUIET:
        return
    _QUIET.append(True)
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_OrbaxTracebacks())
    # orbax's writes still pending when a failed save ends the process are coroutines that
    # are never awaited; Python warns about each at exit, after kronjax's one-line error
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited",
                            category=RuntimeWarning)
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and \
                str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    sys.unraisablehook = hook
