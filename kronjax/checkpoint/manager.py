"""The checkpoint manager: train state + grain iterator + JSON metadata, one orbax step each.

A thin wrapper over `ocp.CheckpointManager` (async saves, `max_to_keep`, save every N steps)
with the items a kronjax run needs: `state` (any pytree of arrays, restored onto the
shardings of an abstract target), `data` (the grain iterator's position), `meta` (config
facts checked before anything is built) and `checksums` (kronjax.checkpoint.checksums,
compared after every restore). Orbax writes a step into `<step>.orbax-checkpoint-tmp` and
renames it once complete, so a run killed mid-save resumes from the previous step.

Restoring the latest step falls back, newest first, past steps that cannot be restored
(missing or truncated files, a missing item, a checksum mismatch, NaN or inf), each named in
a warning; before the next save they are moved into `<directory>.unreadable/`, never deleted.
A state holding NaN or inf is never saved (`NonFiniteStateError`). A failed save (disk full)
is one `CheckpointSaveError` line; `check()` notices a background save's failure.
`read_only=True` (readers beside a live trainer: sample, probes, export) cleans, creates and
writes nothing, and reads again the steps a trainer changed under it.

Everything here must be called on every process (orbax synchronises hosts); the
directory must be shared storage visible to all of them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from kronjax import storage
from kronjax.checkpoint import checksums as checksums_lib
from kronjax.checkpoint import errors as errs

__all__ = ["UNREADABLE_SUFFIX", "Checkpointer"]

log = logging.getLogger("kronjax.checkpoint")

UNREADABLE_SUFFIX = ".unreadable"  # <directory>.unreadable/<step>: steps set aside, kept


def _check_iterator(data_iter: Any) -> None:
    if data_iter is not None and not (
        callable(getattr(data_iter, "get_state", None))
        and callable(getattr(data_iter, "set_state", None))
    ):
        raise TypeError(
            "data_iter must be a grain iterator (iter() of a grain IterDataset or"
            f" DataLoader, with get_state/set_state), got {type(data_iter).__name__}"
        )


class _FailedElsewhere(RuntimeError):
    pass


def _everywhere(ok: bool) -> None:
    """Under several processes, agree on whether a step restored: raise _FailedElsewhere on
    the processes where it did if it failed on another, so all go on to the same step."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    if not np.all(multihost_utils.process_allgather(np.array([ok]))) and ok:
        raise _FailedElsewhere("another process could not restore this step")


def _absolute(directory: str | os.PathLike[str]) -> epath.Path:
    """Orbax's tensorstore backend rejects relative paths; gs:// URLs pass through (checked,
    and pointed at an emulator if one is set)."""
    text = os.fspath(directory)
    if storage.is_url(text):
        return storage.as_path(text)
    return epath.Path(os.path.abspath(text))


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
        read_only: bool = False,
    ) -> None:
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None (keep all), got {max_to_keep}")
        errs.quiet_orbax()
        self.directory = _absolute(directory)
        self.read_only = read_only
        self._pending: int | None = None      # the step of a save that may still be running
        self._unreadable: dict[int, str] = {}  # step -> why it could not be restored
        policies = ocp.checkpoint_managers
        # A reader beside a live trainer: orbax's cleanup would delete the step being written
        options = ocp.CheckpointManagerOptions(
            read_only=True, create=False, cleanup_tmp_directories=False, max_to_keep=None,
            save_interval_steps=0, enable_async_checkpointing=False,
        ) if read_only else ocp.CheckpointManagerOptions(
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
                "checksums": ocp.JsonCheckpointHandler(),
            },
        )
        # Orbax removes what a killed save left behind in a background thread and waits for
        # it only at the next save. Two managers on one directory (a test or `sample` beside
        # a resumed run) would then race two rmtrees over the same files; waiting here makes
        # the cleanup part of opening the directory.
        await_cleanup = getattr(self._mngr, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None and not read_only:
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

        The iterator's position, `meta` and the state's checksums are captured
        before this returns; array writes continue in the background (call
        `wait()` before reading the files, `check()` to learn of a failure).
        Returns whether a save was started. Raises `CheckpointSaveError` if this
        save, or a previous one still unreported, failed.
        """
        step = int(step)
        if self.read_only:
            raise RuntimeError(f"{self.directory} was opened read-only: it cannot be saved to")
        _check_iterator(data_iter)
        try:
            meta_json = errs.as_json(dict(meta))
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint meta must be JSON-serializable: {e}") from e
        self.check()
        self._set_aside_unreadable()
        if not force and not self._mngr.should_save(step):
            return False
        self._finish_pending()  # orbax would wait for it here too; its failure is reported
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
        bad, total = checksums_lib.nonfinite_leaves(state)
        if bad:
            raise errs.NonFiniteStateError.at(step, errs.nonfinite_summary(bad, total), steps,
                                         self.directory)
        items: dict[str, ocp.args.CheckpointArgs] = {
            "state": ocp.args.StandardSave(state),
            "meta": ocp.args.JsonSave(meta_json),
            "checksums": ocp.args.JsonSave(checksums_lib.tree_checksums(state)),
        }
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        try:
            started = bool(self._mngr.save(step, args=ocp.args.Composite(**items), force=True))
        except Exception as e:  # noqa: BLE001 - reported in one line, the cause chained
            raise self._save_error(step, e) from e
        if started:
            self._pending = step
        return started

    def check(self) -> None:
        """Raise `CheckpointSaveError` now if a background save has failed; returns at once
        while one is still running (the train loop calls this after every step)."""
        if self._pending is not None and not self._mngr.is_saving_in_progress():
            self._finish_pending()

    def _finish_pending(self) -> None:
        """Wait for the pending save, if any; its failure as a errs.CheckpointSaveError."""
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        try:
            self._mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - reported in one line, the cause chained
            raise self._save_error(step, e) from e

    def _save_error(self, step: int, e: BaseException) -> errs.CheckpointSaveError:
        log.debug("checkpoint save of step %d failed", step, exc_info=e)
        older = [s for s in self.all_steps() if s != step]
        kept = (f"the earlier checkpoints are untouched (latest: step {older[-1]}; a rerun "
                "resumes from it once the cause is fixed)" if older else
                "there is no earlier checkpoint")
        where = self.directory / str(step)
        return errs.CheckpointSaveError(f"checkpoint save of step {step} to {where} failed: "
                                        f"{errs.describe_failure(e)}; {kept}")

    def _set_aside_unreadable(self) -> None:
        """Move the steps found unreadable out of orbax's directory (kept, never deleted),
        so that saving can continue from the step that was restored."""
        bad = sorted(s for s in self._unreadable if s in self.all_steps())
        self._unreadable.clear()
        if not bad:
            return
        aside = self.directory.parent / (self.directory.name + UNREADABLE_SUFFIX)
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            for s in bad:
                dest, n = aside / str(s), 1
                while dest.exists():
                    n += 1
                    dest = aside / f"{s}-{n}"
                storage.move(self.directory / str(s), dest)
                log.warning("unreadable checkpoint step %d moved to %s (kept for inspection; "
                            "delete it once you no longer need it)", s, dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("kronjax: unreadable checkpoints set aside")
        self._mngr.reload()

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

    def _read_meta(self, step: int) -> dict[str, Any]:
        out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        if not isinstance(out["meta"], Mapping):
            raise ValueError(f"meta holds {type(out['meta']).__name__}, not a JSON object")
        return dict(out["meta"])

    def _restore_step(self, step: int, abstract_state: Any, data_iter: Any,
                      check: Callable[[dict[str, Any]], None] | None) -> tuple[Any, dict]:
        """One step: meta (checked), state and iterator, then the checksums compared."""
        meta = self._read_meta(step)
        if check is not None:
            check(meta)
        path = self.directory / str(step)
        items: dict[str, ocp.args.CheckpointArgs] = {
            "state": ocp.args.StandardRestore(abstract_state)}
        if (path / "checksums").exists():
            items["checksums"] = ocp.args.JsonRestore()
        position = None
        if data_iter is not None:
            mine = path / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
            saved = sorted((path / "data").glob("process_*-of-*.json"))
            if mine.exists():
                items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
            elif saved:
                # Written by another number of processes: every process walks the same
                # global order of window batches, so process 0's position is everyone's.
                position = saved[0]
            else:
                raise FileNotFoundError(f"no data iterator position in {path / 'data'}")
        out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        if "checksums" in items:
            bad = checksums_lib.mismatches(out["state"], dict(out["checksums"]))
            if bad:
                raise errs.ChecksumMismatch(f"checksum mismatch in {len(bad)} array(s): "
                                        f"{'; '.join(bad[:3])} (the files changed after saving)")
        else:
            log.info("checkpoint step %d holds no checksums (an older save): not verified", step)
        bad, total = checksums_lib.nonfinite_leaves(out["state"])
        if bad:
            summary = errs.nonfinite_summary(bad, total)
            raise errs.NonFiniteCheckpoint(f"it holds {summary} (saved from a diverged run)")
        if position is not None:
            data_iter.set_state(json.loads(position.read_text()))
            log.warning("checkpoint written by %s processes, resumed by %d: data position "
                        "taken from %s", position.stem.rpartition("-of-")[2],
                        jax.process_count(), position.name)
        return out["state"], meta

    def _note_unreadable(self, step: int, e: BaseException, older: int | None) -> str:
        """Record step as unreadable, warn once, and return its one-line reason."""
        reason = errs.describe_failure(e)
        if step not in self._unreadable:
            then = f"step {older} is tried" if older is not None else "there is no older step"
            log.warning("checkpoint step %d (%s) cannot be restored: %s; it is kept, and %s",
                        step, self.directory / str(step), reason, then)
        self._unreadable[step] = reason
        return f"  step {step} ({self.directory / str(step)}): {reason}"

    def _newest_readable(self, attempt: Callable[[int], Any]) -> Any:
        """attempt(step) for each step, newest first, until one succeeds. Read-only, beside a
        live trainer: a failure while the trainer saved or deleted steps (max_to_keep) is
        no damage; the steps are listed again and the newest tried (up to 10 times)."""
        for _ in range(10 if self.read_only else 1):
            steps, tried = self.all_steps(), []
            if not steps:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
            for i in range(len(steps) - 1, -1, -1):
                try:
                    out = attempt(steps[i])
                    _everywhere(True)
                except errs.IncompatibleCheckpointError:
                    raise
                except Exception as e:  # noqa: BLE001 - every reason is reported below
                    if self.read_only and self._moved_on(steps):
                        break
                    if not isinstance(e, _FailedElsewhere):
                        _everywhere(False)
                    tried.append(self._note_unreadable(steps[i], e, steps[i - 1] if i else None))
                    continue
                if tried:
                    log.warning("restored checkpoint step %d instead of %d", steps[i], steps[-1])
                return out
            else:
                why = ("every step holds NaN or inf: the run diverged before its first good "
                       "save; start afresh (a fresh --workdir, a lower optim.peak_lr)"
                       if all("NonFiniteCheckpoint" in t for t in tried) else
                       "move the directory aside (or use a fresh --workdir) to start a new run")
                raise errs.UnreadableCheckpointError(
                    f"no checkpoint in {self.directory} can be restored:\n" + "\n".join(tried)
                    + f"\nThey are kept as they are; {why}.")
        raise errs.UnreadableCheckpointError(
            f"the checkpoints in {self.directory} changed 10 times while being read (a live "
            "trainer saving often, keeping few: train.keep_checkpoints); try again")

    def _moved_on(self, steps: list[int]) -> bool:
        """Whether a live trainer saved or deleted steps since `steps` were listed."""
        self._mngr.reload()
        return self.all_steps() != steps

    def restore(
        self, step: int | None, abstract_state: Any, data_iter: Any, *,
        check: Callable[[dict[str, Any]], None] | None = None,
    ) -> tuple[Any, dict[str, Any]]:
        """Return `(state, meta)` of `step`; `data_iter` is restored in place.

        step None: the newest step that restores and whose checksums match,
        with a warning for each newer one that does not (they stay on disk).
        `abstract_state` fixes the tree, shapes, dtypes and shardings of the
        result: typically `jax.eval_shape(init)` with each leaf given its
        sharding (`jax.ShapeDtypeStruct(shape, dtype, sharding=...)`); concrete
        arrays work too. Pass `data_iter=None` to restore only the state.
        `check(meta)` runs before the arrays are read; an
        `IncompatibleCheckpointError` from it is raised as is.
        """
        _check_iterator(data_iter)
        if step is None:
            return self._newest_readable(
                lambda s: self._restore_step(s, abstract_state, data_iter, check))
        step = self._resolve(step)
        if data_iter is not None and not (self.directory / str(step) / "data").exists():
            raise FileNotFoundError(
                f"checkpoint step {step} in {self.directory} holds no data iterator"
                " (it was saved with data_iter=None); pass data_iter=None"
            )
        try:
            return self._restore_step(step, abstract_state, data_iter, check)
        except errs.IncompatibleCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - one line naming the step and the reason
            raise errs.UnreadableCheckpointError(
                f"checkpoint step {step} ({self.directory / str(step)}) cannot be restored: "
                f"{errs.describe_failure(e)}") from e

    def read_meta(self, step: int | None = None) -> dict[str, Any] | None:
        """Metadata of `step` (None: the newest readable, see `restore`) without touching
        the arrays; None if there is no checkpoint."""
        if step is None:
            return None if self.latest_step() is None else self._newest_readable(self._read_meta)
        step = self._resolve(step)
        try:
            return self._read_meta(step)
        except Exception as e:  # noqa: BLE001 - one line naming the step and the reason
            raise errs.UnreadableCheckpointError(
                f"checkpoint step {step} ({self.directory / str(step)}) has unreadable "
                f"metadata: {errs.describe_failure(e)}") from e

    def wait(self) -> None:
        """Block until background saves are on disk (errs.CheckpointSaveError if one failed)."""
        self._finish_pending()
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves (errs.CheckpointSaveError if one failed) and release the manager."""
        try:
            self._finish_pending()
        finally:
            self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
