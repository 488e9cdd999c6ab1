"""A run's directory: every file of a run named once, local or in a bucket alike.

    WORKDIR/checkpoints/           orbax: state, data iterator position, run metadata
    WORKDIR/checkpoints.unreadable/ steps that could not be restored, set aside (kept)
    WORKDIR/config.json            the resolved config the run uses now
    WORKDIR/config_history.jsonl   every config the run started with, and from which step
    WORKDIR/metrics.jsonl          one JSON object per step
    WORKDIR/tb/                    TensorBoard events
    WORKDIR/.lock                  the trainer holding the run (kronjax.lock)
    WORKDIR/wandb.json             the W&B run id a resume continues (kronjax.wandb_sink)

A workdir is a local path or a gs:// URL (`kronjax.storage.as_path`); the same code serves
both. Everything that reads or writes a run's files asks a `Workdir` for their names.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from kronjax import storage

__all__ = ["CHECKPOINTS", "CONFIG", "CONFIG_HISTORY", "LOCK", "METRICS", "TENSORBOARD", "WANDB",
           "Workdir"]

CHECKPOINTS = "checkpoints"
CONFIG = "config.json"
CONFIG_HISTORY = "config_history.jsonl"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
LOCK = ".lock"
WANDB = "wandb.json"


@dataclasses.dataclass(frozen=True)
class Workdir:
    """The files of one run under `root` (a pathlib.Path or an epath.Path for a URL)."""

    root: Any

    @classmethod
    def at(cls, path: str | os.PathLike[str] | Any) -> Workdir:
        return path if isinstance(path, Workdir) else cls(storage.as_path(path))

    @property
    def is_remote(self) -> bool:
        return storage.is_url(self.root)

    @property
    def checkpoints(self) -> Any:
        return self.root / CHECKPOINTS

    @property
    def config(self) -> Any:
        return self.root / CONFIG

    @property
    def config_history(self) -> Any:
        return self.root / CONFIG_HISTORY

    @property
    def metrics(self) -> Any:
        return self.root / METRICS

    @property
    def tensorboard(self) -> Any:
        return self.root / TENSORBOARD

    @property
    def lock(self) -> Any:
        return self.root / LOCK

    @property
    def wandb(self) -> Any:
        return self.root / WANDB

    def create(self) -> None:
        """Make the directory (a bucket has no directories: nothing to make there)."""
        if not self.is_remote:
            self.root.mkdir(parents=True, exist_ok=True)

    def __str__(self) -> str:
        return os.fspath(self.root)

    def __fspath__(self) -> str:
        return os.fspath(self.root)
