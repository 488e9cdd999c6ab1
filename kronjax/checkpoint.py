"""Checkpoints: train state + grain iterator + JSON metadata, one orbax step each.

A thin wrapper over `ocp.CheckpointManager` (async saves, `max_to_keep`, save
every N steps) that fixes the three items a kronjax run needs so resuming is one
call: `state` (any pytree of arrays, restored onto the shardings of an abstract
target), `data` (the grain iterator's position, so no batch is seen twice) and
`meta` (config facts checked before anything is built). Orbax writes each step
into `<step>.orbax-checkpoint-tmp` and renames it only once every item is
written, so a run killed mid-save resumes from the previous complete step.

Everything here must be called on every process (orbax synchronises hosts); the
directory must be shared storage visible to all of them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

__all__ = [
    "COMPAT_KEYS",
    "Checkpointer",
    "IncompatibleCheckpointError",
    "StopFlag",
    "check_compatible",
    "install_sigterm_handler",
]

log = logging.getLogger(__name__)

COMPAT_KEYS: tuple[str, ...] = ("arm", "vocab_fingerprint", "model_shape", "tokenizer")
_MISSING = "<missing>"


class IncompatibleCheckpointError(ValueError):
    """The checkpoint in a workdir was written by a run this config cannot resume."""


def _as_json(value: Any) -> Any:
    """What `value` reads back as after a JSON round trip (tuples become lists)."""
    return json.loads(json.dumps(value))


def check_compatible(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    keys: Sequence[str] = COMPAT_KEYS,
) -> None:
    """Raise `IncompatibleCheckpointError` naming every key where the runs differ.

    Values are compared as JSON (the form `saved` was stored in), so a tuple
    `model_shape` matches its saved list. A key absent from both is fine; absent
    from one side only is a mismatch.
    """
    diffs = []
    for key in keys:
        s = saved.get(key, _MISSING)
        c = _as_json(current[key]) if key in current else _MISSING
        if s != c:
            diffs.append(f"  {key}: checkpoint has {s!r}, current config has {c!r}")
    if diffs:
        raise IncompatibleCheckpointError(
            "the checkpoint cannot be resumed with this config:\n"
            + "\n".join(diffs)
            + "\nUse a fresh --workdir for a new run, or rerun with the config that"
            " wrote this checkpoint."
        )


def _check_iterator(data_iter: Any) -> None:
    if data_iter is not None and not (
        callable(getattr(data_iter, "get_state", None))
        and callable(getattr(data_iter, "set_state", None))
    ):
        raise TypeError(
            "data_iter must be a grain iterator (iter() of a grain IterDataset or"
            f" DataLoader, with get_state/set_state), got {type(data_iter).__name__}"
        )


def _absolute(directory: str | os.PathLike[str]) -> epath.Path:
    """Orbax's tensorstore backend rejects relative paths; remote URLs pass through."""
    text = os.fspath(directory)
    return epath.Path(text if "://" in text else os.path.abspath(text))


class Checkpointer:
    """Save every `save_every` steps, keep the newest `max_to_keep`, resume the latest.

    Saving a step that is already on disk keeps the existing checkpoint and
    returns False (so an end-of-run `force=True` save after a regular one is a
    no-op); saving a step older than the latest raises, because that means two
    runs share the directory.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        save_every: int,
        max_to_keep: int | None = 3,
        async_save: bool = True,
    ) -> None:
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None (keep all), got {max_to_keep}")
        self.directory = _absolute(directory)
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            # Exactly every `save_every` steps or at a preemption sync point.
            # Orbax's default also saves the first step it sees (InitialSavePolicy).
            save_decision_policy=policies.AnySavePolicy(
                [policies.FixedIntervalPolicy(save_every), policies.PreemptionCheckpointingPolicy()]
            ),
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # drop what a killed save left behind
        )
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )
        # Orbax removes what a killed save left behind in a background thread and waits for
        # it only at the next save. Two managers on one directory (a test or `sample` beside
        # a resumed run) would then race two rmtrees over the same files; waiting here makes
        # the cleanup part of opening the directory.
        await_cleanup = getattr(self._mngr, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()

    def all_steps(self) -> list[int]:
        """Finalized steps, oldest first (interrupted saves are not steps)."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def should_save(self, step: int) -> bool:
        """True on the save cadence or at a multi-host preemption sync point."""
        return self._mngr.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """True when all hosts agreed to save at `step` after a preemption notice.

        JAX's preemption service (active after `jax.distributed.initialize`)
        turns a SIGTERM on any host into one agreed step; call this on every
        step on every host. Always False in a single process: use
        `install_sigterm_handler` there.
        """
        return self._mngr.reached_preemption(step)

    def save(
        self,
        step: int,
        state: Any,
        data_iter: Any,
        meta: Mapping[str, Any],
        *,
        force: bool = False,
    ) -> bool:
        """Start an (async) save of `step` if due, or regardless with `force`.

        The iterator's position and `meta` are captured before this returns;
        array writes continue in the background (call `wait()` before reading
        the files). Returns whether a save was started.
        """
        step = int(step)
        _check_iterator(data_iter)
        try:
            meta_json = _as_json(dict(meta))
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint meta must be JSON-serializable: {e}") from e
        steps = self.all_steps()
        if step in steps:
            log.warning(
                "checkpoint for step %d already exists in %s; kept as is", step, self.directory
            )
            return False
        if steps and step < steps[-1]:
            raise ValueError(
                f"refusing to save step {step} behind the newer step {steps[-1]} in"
                f" {self.directory}: another run is using this directory; use a fresh --workdir"
            )
        items: dict[str, ocp.args.CheckpointArgs] = {
            "state": ocp.args.StandardSave(state),
            "meta": ocp.args.JsonSave(meta_json),
        }
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return bool(self._mngr.save(step, args=ocp.args.Composite(**items), force=force))

    def _resolve(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; available: {steps}"
            )
        return int(step)

    def restore(
        self, step: int | None, abstract_state: Any, data_iter: Any
    ) -> tuple[Any, dict[str, Any]]:
        """Return `(state, meta)` of `step` (None: latest); `data_iter` is restored in place.

        `abstract_state` fixes the tree, shapes, dtypes and shardings of the
        result: typically `jax.eval_shape(init)` with each leaf given its
        sharding (`jax.ShapeDtypeStruct(shape, dtype, sharding=...)`); concrete
        arrays work too. Pass `data_iter=None` to restore only the state.
        """
        _check_iterator(data_iter)
        step = self._resolve(step)
        items: dict[str, ocp.args.CheckpointArgs] = {
            "state": ocp.args.StandardRestore(abstract_state),
            "meta": ocp.args.JsonRestore(),
        }
        if data_iter is not None:
            if not (self.directory / str(step) / "data").exists():
                raise FileNotFoundError(
                    f"checkpoint step {step} in {self.directory} holds no data iterator"
                    " (it was saved with data_iter=None); pass data_iter=None"
                )
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        return out["state"], dict(out["meta"])

    def read_meta(self, step: int | None = None) -> dict[str, Any] | None:
        """Metadata of `step` (None: latest) without touching the arrays; None if no checkpoint."""
        if step is None and self.latest_step() is None:
            return None
        step = self._resolve(step)
        out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def wait(self) -> None:
        """Block until background saves are on disk (raises their errors)."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
