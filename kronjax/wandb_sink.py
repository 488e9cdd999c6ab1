"""Weights & Biases: every metrics record of a run, its resolved config and its parameter
counts, in one W&B run that a resume continues (the `wandb` extra; off unless
`--config.log.wandb=PROJECT`).

W&B is a second copy, never the record: metrics.jsonl stays the durable one. A missing
package, an unknown project or an unreachable service costs one warning and the run goes on
with its local logs; so does a failure later on (the sink turns itself off). The W&B run id
is kept in the workdir (kronjax.workdir's wandb.json), so rerunning the same command resumes
the same W&B run. W&B's own files go to WORKDIR/wandb, or for a gs:// workdir to this host's
cache (a bucket has no append; they are W&B's to sync, not the run's).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from kronjax import config as config_lib
from kronjax import storage
from kronjax.workdir import Workdir

__all__ = ["WandbSink", "open_sink", "settings_of"]

log = logging.getLogger("kronjax.wandb")


def settings_of(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The `log` section's W&B keys ({} when off, or for configs written before it existed)."""
    section = config_lib.section(cfg, "log")
    project = str(section.get("wandb", "") or "")
    if not project:
        return {}
    tags = [t.strip() for t in str(section.get("wandb_tags", "") or "").split(",") if t.strip()]
    return {"project": project, "entity": str(section.get("wandb_entity", "") or "") or None,
            "name": str(section.get("wandb_name", "") or "") or None,
            "group": str(section.get("wandb_group", "") or "") or None, "tags": tags}


def _files_dir(wd: Workdir) -> Path:
    if not wd.is_remote:
        return Path(wd.root)
    root = Path(os.environ.get("KRONJAX_WANDB_DIR", Path.home() / ".cache" / "kronjax" / "wandb"))
    return root / os.fspath(wd.root).split("://", 1)[1]


class WandbSink:
    """One W&B run: `log(step, record)` for every metrics record, `finish()` at the end."""

    def __init__(self, run: Any) -> None:
        self._run = run

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        if self._run is None:
            return
        try:
            self._run.log(dict(record), step=int(step))
        except Exception as e:  # noqa: BLE001 - W&B is a copy: the run goes on without it
            log.warning("W&B logging failed (%s); the run goes on with its local logs only", e)
            self._run = None

    def finish(self) -> None:
        if self._run is None:
            return
        try:
            self._run.finish()
        except Exception as e:  # noqa: BLE001
            log.warning("W&B could not finish its run (%s); metrics.jsonl has every record", e)
        self._run = None


def _run_id(wd: Workdir) -> str:
    """The W&B run id of this workdir: the one a previous start recorded, else a new one."""
    path = wd.wandb
    if path.exists():
        try:
            return str(json.loads(path.read_text())["id"])
        except (ValueError, KeyError, TypeError):
            log.warning("%s is unreadable: a new W&B run is started", path)
    run_id = uuid.uuid4().hex[:12]
    storage.write_bytes(path, json.dumps({"id": run_id}).encode())
    return run_id


def open_sink(cfg: ml_collections.ConfigDict, workdir: Workdir,
              counts: Mapping[str, int]) -> WandbSink | None:
    """The run's W&B sink, or None when W&B is off or cannot be used (said in one warning)."""
    settings = settings_of(cfg)
    if not settings:
        return None
    try:
        import wandb
    except ImportError:
        log.warning("log.wandb is set but wandb is not installed (pip install "
                    "'kronjax[wandb]'): logging locally only")
        return None
    try:
        files = _files_dir(workdir)
        files.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=settings["project"], entity=settings["entity"],
                         name=settings["name"], group=settings["group"], tags=settings["tags"],
                         id=_run_id(workdir), resume="allow", dir=str(files),
                         config=cfg.to_dict(), settings=wandb.Settings(init_timeout=30,
                                                                        silent=True))
        run.summary.update({f"params_{k}": int(v) for k, v in counts.items()})
    except Exception as e:  # noqa: BLE001 - an unknown project, no key, no network...
        log.warning("W&B could not start (%s: %s): logging locally only", type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "")
        return None
    log.info("W&B run %s (project %s, %s)", run.id, settings["project"],
             getattr(run.settings, "mode", "online"))
    return WandbSink(run)
