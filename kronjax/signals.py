"""Stop signals: SIGTERM / SIGINT become a flag the train loop polls, so it saves and exits 0.

`install_sigterm_handler` installs `StopFlag` in a single process; under jax.distributed it
leaves SIGTERM to JAX's preemption sync point (`Checkpointer.reached_preemption`). The train
loop (kronjax.loop) owns stopping; the checkpoint is what a stop saves.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import jax

__all__ = ["StopFlag", "install_sigterm_handler"]

log = logging.getLogger("kronjax.signals")


class StopFlag:
    """Callable that turns True once a stop signal arrives, so the loop saves and exits 0.

    A second signal exits at once, without saving: the signal's default action (SIGINT /
    SIGTERM kill the process), so a run stuck somewhere, or a user who will not wait for the
    save, can still stop it. Checkpoints already on disk are untouched (an unfinished save is
    a tmp directory that the next run removes).
    """

    def __init__(self, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)
                 ) -> None:
        self._event = threading.Event()
        self._previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("install_sigterm_handler must be called from the main thread")
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        name = signal.Signals(signum).name
        if self._event.is_set():
            log.warning("second %s: exiting now, without saving", name)
            self.uninstall()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        log.warning("received %s; will checkpoint after this step and stop (send it again to "
                    "exit at once, without saving)", name)
        self._event.set()

    def __call__(self) -> bool:
        return self._event.is_set()

    def uninstall(self) -> None:
        """Put back the handlers that were there before."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


class _Never:
    def __call__(self) -> bool:
        return False

    def uninstall(self) -> None:
        pass


def install_sigterm_handler() -> Callable[[], bool]:
    """Record SIGTERM (preemption, `scancel`, `kill`) and SIGINT (Ctrl-C) in a flag the train
    loop polls, so both save at the next step boundary and exit 0.

    Single process only: under `jax.distributed` a Python handler would replace
    JAX's own preemption notifier and let hosts stop at different steps (a
    deadlock in the collective save), so there this installs nothing and
    returns a flag that stays False; use `Checkpointer.reached_preemption`.
    The result has `.uninstall()`.
    """
    if jax.process_count() > 1:
        log.info("multi-process run: SIGTERM is left to JAX's preemption sync point")
        return _Never()
    return StopFlag()
