"""Run lm-eval tasks on a trained run in process: the shipped offline tasks or installed ones.

Task names resolve through lm-eval's TaskManager over the shipped `tasks/` directory, any
`include_paths`, and (unless every name is found in those) lm-eval's own registry of
installed tasks, which fetch their data from the Hugging Face hub. When every task is local,
the hub is switched off for the process (HF_DATASETS_OFFLINE, HF_HUB_OFFLINE), so nothing
can reach the network.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kronjax.errors import UserError

TASK_DIR = Path(__file__).resolve().parent / "tasks"
SHIPPED_PREFIX = "kronjax_"  # the shipped tasks and their tag
EXTRA = "eval"


def require_lm_eval() -> None:
    """A one-line UserError naming the extra when lm-eval is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise UserError(f"lm-evaluation-harness is not installed ({e.name} missing): "
                        f"pip install -e '.[{EXTRA}]' (or pip install lm-eval)") from None


def local_task_names(include_paths: Sequence[str | Path] = ()) -> set[str]:
    """Task and tag names the shipped directory and include_paths define (read from the
    YAMLs without lm-eval: `task:` and `tag:` lines)."""
    names: set[str] = set()
    for root in (TASK_DIR, *map(Path, include_paths)):
        for yaml in Path(root).rglob("*.yaml"):
            for line in yaml.read_text(encoding="utf-8").splitlines():
                key, _, value = line.partition(":")
                if key.strip() in ("task", "tag", "group") and value.strip():
                    names.add(value.strip().strip("'\""))
    return names


class _NoCustomDatasetNote(logging.Filter):
    """lm-eval warns, for every task with a custom_dataset (the shipped ones), how to pass it
    arguments; there are none to pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


_NOTE_FILTER = _NoCustomDatasetNote()


def go_offline() -> None:
    """No Hugging Face hub for this process (set before `datasets` is imported)."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")


def run_tasks(run: Any, tasks: Sequence[str], *, limit: float | None = None,
              num_fewshot: int | None = None, batch_size: int = 8,
              include_paths: Sequence[str | Path] = (), bootstrap_iters: int = 1000,
              log_samples: bool = False, seed: int = 0) -> dict[str, Any]:
    """lm-eval's simple_evaluate on `run` (kronjax.run.Loaded); its results dict."""
    require_lm_eval()
    for path in include_paths:
        if not Path(path).is_dir():
            raise UserError(f"--include-path {path}: not a directory of lm-eval task YAMLs")
    local = local_task_names(include_paths)
    # No installed lm-eval task is named kronjax_*: a typo in one is refused without indexing
    # lm-eval's whole registry (tens of seconds).
    all_local = all(t in local or t.startswith(SHIPPED_PREFIX) for t in tasks)
    if all_local:
        go_offline()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval.api.task").addFilter(_NOTE_FILTER)  # once: a filter is a set

    from kronjax.evaluate.lm import KronjaxLM

    manager = TaskManager(include_path=[str(TASK_DIR), *map(str, include_paths)],
                          include_defaults=not all_local)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        where = ("the shipped tasks (kronjax_shakespeare*) and --include-path" if all_local
                 else "lm-eval's installed tasks, the shipped ones and --include-path")
        raise UserError(f"unknown task(s) {', '.join(unknown)}: not among {where} "
                        f"(lm_eval ls tasks lists the installed ones)")
    lm = KronjaxLM(run, batch_size=batch_size, seed=seed)
    t0 = time.perf_counter()
    results = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, bootstrap_iters=bootstrap_iters,
                              log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
                              torch_random_seed=None,  # no torch here: seeding it imports it
                              fewshot_random_seed=seed)
    if results is None:  # only a non-zero rank gets None; kronjax evaluates in one process
        raise RuntimeError("lm-eval returned no results")
    c = run.model.config
    results["kronjax"] = {"step": int(run.step), "arm": c.arm, "block_size": c.block_size,
                          "tokenizer": run.tokenizer.spec, "tasks": list(tasks), "limit": limit,
                          "num_fewshot": num_fewshot, "batch_size": batch_size,
                          "seconds": round(time.perf_counter() - t0, 1),
                          "offline": all_local}
    return results
