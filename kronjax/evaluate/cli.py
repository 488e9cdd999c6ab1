"""`python -m kronjax.evaluate --workdir W --tasks T[,T2] [--limit N] [--step S]`.

Runs lm-evaluation-harness tasks on a trained run in process (kronjax.evaluate.lm), with no
export, and writes lm-eval's results JSON to W/lm_eval/step<S>_<tasks>.json (an existing
file is kept unless --force; --out names another file). Prints lm-eval's table.

Offline, the shipped tasks: `kronjax_shakespeare` (all three), or one of
kronjax_shakespeare_nextline (multiple choice: the next line of the held-out play),
kronjax_shakespeare_speaker (generate the next speaker's name) and
kronjax_shakespeare_passages (bits per byte of held-out passages). Your own task YAMLs:
--include-path DIR. Any task lm-eval has installed (hellaswag, lambada_openai, arc_easy,
...) works the same on a machine that can reach the Hugging Face hub.
Needs the `eval` extra: pip install -e '.[eval]'.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kronjax.errors import UserError

RESULTS_DIR = "lm_eval"


def results_path(workdir: Path, step: int, tasks: Sequence[str]) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", "+".join(tasks))[:80]
    return workdir / RESULTS_DIR / f"step{step}_{slug}.json"


def write_results(path: Path, results: dict[str, Any], force: bool) -> None:
    """Whole or not at all: a temporary file renamed into place."""
    from lm_eval.utils import handle_non_serializable

    from kronjax.files import write_atomic

    if path.exists() and not force:
        raise UserError(f"{path} exists; pass --force to replace it, or --out FILE")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    write_atomic(path, (text + "\n").encode("utf-8"))


def _limit(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--limit must be > 0 (a count, or a fraction < 1); "
                                         f"got {text}")
    return int(value) if value >= 1 and value == int(value) else value


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kronjax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a kronjax.train run directory")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--limit", type=_limit, default=None,
                   help="at most N documents per task (a fraction < 1: that share)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    p.add_argument("--include-path", action="append", default=[],
                   help="a directory of your own lm-eval task YAMLs (repeatable)")
    p.add_argument("--bootstrap-iters", type=int, default=1000,
                   help="bootstrap resamples for the stderr of non-mean metrics (0: none)")
    p.add_argument("--log-samples", action="store_true",
                   help="keep every request and response in the results JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results file (default: "
                   f"WORKDIR/{RESULTS_DIR}/step<S>_<tasks>.json)")
    p.add_argument("--force", action="store_true", help="replace an existing results file")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        p.error("--tasks needs at least one task name")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1; got {args.batch_size}")
    try:
        from kronjax.evaluate.harness import require_lm_eval, run_tasks

        require_lm_eval()
        workdir = Path(args.workdir)
        if not workdir.is_dir():
            raise UserError(f"--workdir {workdir} is not a directory")
        from kronjax import compile_cache
        from kronjax.run import load_run

        run = load_run(workdir, args.step)
        compile_cache.setup(run.cfg, workdir)
        out = Path(args.out) if args.out else results_path(workdir, run.step, tasks)
        if out.exists() and not args.force:  # before the work, not after
            raise UserError(f"{out} exists; pass --force to replace it, or --out FILE")
        results = run_tasks(run, tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                            batch_size=args.batch_size, include_paths=args.include_path,
                            bootstrap_iters=args.bootstrap_iters,
                            log_samples=args.log_samples, seed=args.seed)
        results["kronjax"]["workdir"] = str(workdir)
        write_results(out, results, args.force)
    except (UserError, FileNotFoundError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    from lm_eval.utils import make_table

    print(make_table(results))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
