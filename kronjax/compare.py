"""`python -m kronjax.compare --config FILE --arms A,B --seeds 3 --out DIR [--reference A]
[--config.a.b=v]`

Trains every arm x seed into DIR/<arm>_s<seed> with kronjax.train, then reports per arm the
mean ± std (ddof=1) of the final validation loss and bits per byte, the per-seed values, the
gap of each arm to each reference arm (default: the first) with a 95% paired-t interval over
the per-seed differences and a 95% Welch-t interval, the same paired gap at every evaluation
against tokens seen (the gap curve), steps-to-match, and PNG plots of the loss curves, the
input-side norm drift and the gap curve (DIR/summary.{md,json}, *.png).

An "arm" may also be a variant the config file defines with get_variants(), e.g. kron_8l =
kron with model.n_layer=8 (kronjax/variants.py): `--arms bpe_untied,kron_8l`.

Paired by design: every arm runs with the same seeds, and a seed fixes the data order and the
init of every parameter outside the input side (Flax derives each module's init key from its
name, so the blocks, positions and any head draw the same values in every arm).

Resumable: a run whose metrics.jsonl has the final step with val_loss is skipped; an
interrupted one is resumed by train's own checkpoint resume. A run directory trained with a
different config is an error, never silently mixed in. `--seeds N` means seeds 0..N-1;
`--seeds 1,4,7` names them. `--report-only` reports on the finished runs without training.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from kronjax import config as config_lib
from kronjax import loop as train_lib
from kronjax import plots, stats, storage
from kronjax import variants as variants_lib
from kronjax.metrics import read_metrics
from kronjax.stats import curves, mean_curve
from kronjax.workdir import Workdir

log = logging.getLogger("kronjax.compare")
# May differ between invocations without changing what a run computes: the progress bar, the
# attention kernel (the same function per platform), where compiled programs are cached (runs
# made before the key existed lack it), and where a run executes (mesh layout, process setup).
IGNORED_KEYS = ("train.progress", "model.attention", "train.compile_cache")
IGNORED_PREFIXES = ("mesh.", "dist.", "log.")  # and where it logs (W&B)
Runs = Mapping[str, Mapping[int, Sequence[Mapping[str, Any]]]]  # {arm: {seed: records}}


class RunMismatchError(ValueError):
    """A run directory holds a run made with another config."""


# -- runs --------------------------------------------------------------------------------------
def run_name(arm: str, seed: int) -> str:
    return f"{arm}_s{seed}"


def parse_arms(text: str, variants: variants_lib.Variants | None = None) -> list[str]:
    """'bpe_untied,kron_8l' -> names, each an arm or one of the config file's variants."""
    return variants_lib.parse_names(text, variants or {})


def parse_seeds(text: str) -> list[int]:
    """'3' -> [0, 1, 2]; '1,4,7' -> [1, 4, 7]."""
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds takes a count (3) or a list (0,4,7); got {text!r}") from None
    if len(vals) == 1 and "," not in text:
        if vals[0] < 1:
            raise ValueError(f"--seeds count must be >= 1; got {vals[0]}")
        return list(range(vals[0]))
    if len(set(vals)) != len(vals) or not vals:
        raise ValueError(f"--seeds needs distinct integers; got {text!r}")
    return vals


def run_config(base: ml_collections.ConfigDict, arm: str, seed: int,
               variants: variants_lib.Variants | None = None) -> ml_collections.ConfigDict:
    """The config one run trains with: the base, the arm's (or variant's) settings, the seed."""
    cfg = variants_lib.apply(base, variants_lib.settings_of(arm, variants or {}), arm)
    cfg.seed = seed
    if "log" in cfg and cfg.log.get("wandb") and not cfg.log.get("wandb_name"):
        cfg.log.wandb_name = run_name(arm, seed)  # W&B: one run per arm and seed ...
    return cfg


def is_finished(workdir: str | Path | Workdir, steps: int) -> bool:
    """Finished = metrics.jsonl has the final step with its val_loss."""
    return any(r["step"] == steps and r.get("val_loss") is not None
               for r in read_metrics(Workdir.at(workdir).metrics))


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(cfg: ml_collections.ConfigDict, saved: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between a config and a run's saved config.json."""
    new = _flat(json.loads(config_lib.to_json(cfg)))
    old = _flat(saved)
    keys = sorted(k for k in (set(new) | set(old)) - set(IGNORED_KEYS)
                  if not k.startswith(IGNORED_PREFIXES))
    return [k for k in keys if new.get(k, "<absent>") != old.get(k, "<absent>")]


def check_run_dir(workdir: Any, cfg: ml_collections.ConfigDict) -> None:
    """Refuse a run directory whose saved config differs from the one we would train."""
    wd = Workdir.at(workdir)
    saved = wd.config
    if saved.is_file():
        diff = config_diff(cfg, config_lib.read_saved_config(saved))
        if diff:
            raise RunMismatchError(
                f"{workdir} was trained with a different config ({', '.join(diff)} differ); "
                "use another --out, or move that run away")
    elif wd.metrics.exists():
        raise RunMismatchError(f"{workdir} has metrics.jsonl but no config.json: not a run "
                               "this tool can resume; use another --out")


def run_all(cfg: ml_collections.ConfigDict, arms: Sequence[str], seeds: Sequence[int],
            out: str | Path, variants: variants_lib.Variants | None = None) -> dict[str, str]:
    """Train (or skip, or resume) every arm x seed; returns {run name: what happened}.

    Stops early, returning "preempted" for that run, when train was told to stop (SIGTERM).
    """
    out = storage.as_path(out)
    steps = int(cfg.train.steps)
    # Seed-major: an interrupted comparison still holds every arm for its finished seeds.
    jobs = [(a, s, run_config(cfg, a, s, variants), out / run_name(a, s))
            for s in seeds for a in arms]
    for _, _, rcfg, wd in jobs:  # check every directory before training anything
        check_run_dir(wd, rcfg)
    status: dict[str, str] = {}
    for arm, seed, rcfg, wd in jobs:
        name = run_name(arm, seed)
        if is_finished(wd, steps):
            status[name] = "skipped (finished)"
            log.info("%s: finished, skipped", name)
            continue
        resumed = Workdir.at(wd).checkpoints.exists()
        log.info("%s: %s", name, "resuming" if resumed else "training")
        result = train_lib.train(rcfg, wd)
        if result.preempted:
            status[name] = "preempted"
            log.warning("%s was stopped at step %d; rerun the same command to resume", name,
                        result.step)
            break
        status[name] = "resumed" if resumed else "trained"
    return status


# -- summary ---------------------------------------------------------------------------------------
def final_values(runs: Runs, steps: int) -> dict[str, dict[str, dict[int, float]]]:
    """{arm: {metric: {seed: value at the final step}}}; an unfinished run is an error."""
    finals: dict[str, dict[str, dict[int, float]]] = {}
    for arm, seeds in runs.items():
        finals[arm] = {"val_loss": {}, "val_bpb": {}}
        for seed, recs in seeds.items():
            last = [r for r in recs if r["step"] == steps and r.get("val_loss") is not None]
            if not last:
                raise ValueError(f"run {run_name(arm, seed)} has no final val_loss at step "
                                 f"{steps}: it is not finished")
            finals[arm]["val_loss"][seed] = float(last[0]["val_loss"])
            finals[arm]["val_bpb"][seed] = float(last[0].get("val_bpb", float("nan")))
    return finals


def param_counts(runs: Runs, key: str = "params_input_side") -> dict[str, int | None]:
    """Each arm's parameter count `key` (params_input_side, params_total, ...), from the
    step-0 record train writes; None where the seeds disagree or none recorded it."""
    out: dict[str, int | None] = {}
    for arm, seeds in runs.items():
        counts = {r[key] for recs in seeds.values() for r in recs if r.get(key) is not None}
        out[arm] = counts.pop() if len(counts) == 1 else None
    return out


def input_params(runs: Runs) -> dict[str, int | None]:
    return param_counts(runs, "params_input_side")


def gap_curves(runs: Runs, pairs: Sequence[tuple[str, str]], tokens_per_step: int | None
               ) -> list[dict[str, Any]]:
    """Paired gap arm - reference at every evaluation, per (arm, reference) and metric."""
    out = []
    for ref, b in pairs:
        for metric in ("val_loss", "val_bpb"):
            pts = stats.paired_curve({s: curves(r, metric) for s, r in runs[ref].items()},
                                     {s: curves(r, metric) for s, r in runs[b].items()})
            for p in pts:
                p["tokens"] = p["step"] * tokens_per_step if tokens_per_step else p["step"]
            out.append({"arm": b, "reference": ref, "metric": metric, "points": pts})
    return out


def summarise(runs: Runs, steps: int, eval_every: int,
              references: Sequence[str] | None = None,
              tokens_per_step: int | None = None) -> dict[str, Any]:
    """Statistics from {arm: {seed: metrics records}}.

    Every arm is compared with each reference arm (default: the first arm) twice: Welch's
    interval treats the arms' seeds as independent samples; the paired interval uses the
    per-seed differences, valid because a seed fixes the data order and all init but the
    input side in every arm.
    """
    arms = list(runs)
    refs = list(references or arms[:1])
    if bad := [r for r in refs if r not in runs]:
        raise ValueError(f"reference arm(s) {bad} are not among the compared arms {arms}")
    finals = final_values(runs, steps)
    summary: dict[str, Any] = {
        "steps": steps, "eval_every": eval_every, "reference_arm": refs[0],
        "reference_arms": refs, "input_params": input_params(runs),
        "total_params": param_counts(runs, "params_total"), "tokens_per_step": tokens_per_step,
        "arms": {a: {m: stats.mean_std(list(v.values())) for m, v in finals[a].items()}
                 | {"seeds": list(runs[a])} for a in arms},
        "per_seed": {a: {m: {str(k): x for k, x in v.items()} for m, v in finals[a].items()}
                     for a in arms},
        "gaps": [], "paired": [], "steps_to_match": [],
        "notes": ["gap = mean(arm) - mean(reference); negative means the arm is better",
                  "paired: per-seed differences arm - reference over the seeds both have "
                  "(same seed = same data order and same init outside the input side), "
                  "95% paired-t interval",
                  "std is the sample std (ddof=1) over seeds",
                  f"validation is measured every {eval_every} steps (and at the last); "
                  "steps-to-match interpolates linearly between evaluations",
                  "gap curve: the paired gap at every evaluation, tokens seen = step x "
                  f"{tokens_per_step or '1 (unknown: tokens are steps)'} tokens per step"]}
    pairs = [(ref, b) for ref in refs for b in arms if b != ref]
    summary["gap_curves"] = gap_curves(runs, pairs, tokens_per_step)
    for (ref, b), metric in ((pair, m) for pair in pairs for m in ("val_loss", "val_bpb")):
        ra, rb = finals[ref][metric], finals[b][metric]
        summary["gaps"].append({"arm": b, "reference": ref, "metric": metric,
                                **stats.welch(list(ra.values()), list(rb.values()))})
        summary["paired"].append({"arm": b, "reference": ref, "metric": metric,
                                  **stats.paired(ra, rb)})
    val_curves = {a: mean_curve([curves(r, "val_loss") for r in runs[a].values()]) for a in arms}
    for a in arms:
        for b in arms:
            if a != b:
                target = float(np.mean(list(finals[a]["val_loss"].values())))
                summary["steps_to_match"].append(
                    {"arm": b, "target_arm": a, "target_val_loss": target,
                     **stats.steps_to_match(val_curves[b], target, steps)})
    return summary


def _ci(g: Mapping[str, Any]) -> str:
    return f"[{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}]" if g["ci95"] else "-"


def to_markdown(summary: Mapping[str, Any]) -> str:
    def pm(d: Mapping[str, Any]) -> str:
        return f"{d['mean']:.4f}" + (f" ± {d['std']:.4f}" if d["std"] is not None else "")
    refs = summary["reference_arms"]
    lines = [f"## Arm comparison ({summary['steps']} steps, reference arm(s) "
             f"{', '.join(f'`{r}`' for r in refs)})", "",
             "| arm | seeds | input-side params | total params | final val loss (nats) "
             "| val bits/byte |", "|---|---|---|---|---|---|"]
    for arm, d in summary["arms"].items():
        n_in, n_all = (summary.get(k, {}).get(arm) for k in ("input_params", "total_params"))
        lines.append(f"| {arm} | {d['val_loss']['n']} | {'-' if n_in is None else f'{n_in:,}'} "
                     f"| {'-' if n_all is None else f'{n_all:,}'} "
                     f"| {pm(d['val_loss'])} | {pm(d['val_bpb'])} |")
    if summary.get("variants"):
        lines += ["", "Variants (the config file's get_variants(); a single run is "
                  "`python -m kronjax.train` with the config and these flags):", ""]
        lines += [f"- `{name}`: `{variants_lib.train_flags(settings)}`"
                  for name, settings in summary["variants"].items()]
    seeds = sorted({s for per in summary["per_seed"].values() for s in per["val_loss"]}, key=int)
    lines += ["", "Per seed, final val loss / bits per byte:", "",
              "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---" * (len(seeds) + 1) + "|"]
    for arm, per in summary["per_seed"].items():
        cells = [f"{per['val_loss'][s]:.4f} / {per['val_bpb'][s]:.4f}" if s in per["val_loss"]
                 else "-" for s in seeds]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "| arm − reference | metric | paired gap | paired 95% CI | per seed "
              "| Welch gap | Welch 95% CI |", "|---|---|---|---|---|---|---|"]
    welch_by = {(g["arm"], g["reference"], g["metric"]): g for g in summary["gaps"]}
    for p in summary["paired"]:
        w = welch_by[(p["arm"], p["reference"], p["metric"])]
        per = ", ".join(f"{v:+.4f}" for v in p["per_seed"].values())
        lines.append(f"| {p['arm']} − {p['reference']} | {p['metric']} | {p['diff']:+.4f} | "
                     f"{_ci(p)} | {per} | {w['diff']:+.4f} | {_ci(w)} |")
    lines += ["", "Paired gap at every evaluation (val loss in nats, arm − reference):", "",
              "| arm − reference | step | tokens seen | paired gap | paired 95% CI | per seed |",
              "|---|---|---|---|---|---|"]
    for g in (g for g in summary.get("gap_curves", []) if g["metric"] == "val_loss"):
        for p in g["points"]:
            per = ", ".join(f"{v:+.4f}" for v in p["per_seed"].values())
            lines.append(f"| {g['arm']} − {g['reference']} | {p['step']} | {p['tokens']:,} "
                         f"| {p['diff']:+.4f} | {_ci(p)} | {per} |")
    lines += ["", "| arm | reaches final val loss of | at step | × target arm's steps | note |",
              "|---|---|---|---|---|"]
    for m in summary["steps_to_match"]:
        step = "-" if m["step"] is None else f"{m['step']:.0f}"
        ratio = "-" if m["ratio"] is None else f"{m['ratio']:.2f}"
        lines.append(f"| {m['arm']} | {m['target_arm']} ({m['target_val_loss']:.4f}) | {step} "
                     f"| {ratio} | {m['note']} |")
    methods = sorted({g["method"] for g in [*summary["gaps"], *summary["paired"]]})
    lines += [""] + [f"- {n}" for n in summary["notes"]] + [f"- intervals: {'; '.join(methods)}"]
    return "\n".join(lines) + "\n"


def report(out: str | Path, arms: Sequence[str], seeds: Sequence[int],
           cfg: ml_collections.ConfigDict, extra: Mapping[str, Any] | None = None,
           references: Sequence[str] | None = None,
           variants: variants_lib.Variants | None = None) -> dict[str, Any]:
    """Read every run's metrics, write summary.{md,json} and the plots; returns the summary."""
    out = storage.as_path(out)
    runs = {a: {s: read_metrics(Workdir.at(out / run_name(a, s)).metrics) for s in seeds}
            for a in arms}
    summary = summarise(runs, int(cfg.train.steps), int(cfg.train.eval_every), references,
                        int(cfg.train.batch_size) * int(cfg.model.block_size))
    summary["variants"] = {a: dict(variants[a]) for a in arms if a in (variants or {})}
    summary.update(dict(extra or {}))
    plots.plot_curves(runs, out / "loss_curves.png")
    plots.plot_norms(runs, out / "norm_drift.png")
    summary["plots"] = ["loss_curves.png", "norm_drift.png"]
    if summary["gap_curves"]:  # one arm alone has no gap
        plots.plot_gap_curves(summary["gap_curves"], out / "gap_curve.png")
        summary["plots"].append("gap_curve.png")
    md = to_markdown(summary)
    storage.write_bytes(out / "summary.md", md.encode("utf-8"))
    storage.write_bytes(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    log.info("report (re)written from the runs' metrics: %s/summary.{md,json}, *.png", out)
    summary["markdown"] = md
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m kronjax.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(config_lib.DEFAULT_CONFIG))
    parser.add_argument("--arms", default="bpe_tied,kron",
                        help="comma-separated arms or config variants (get_variants); the "
                             "first is the default reference")
    parser.add_argument("--reference", default="",
                        help="arm(s) every other arm is compared with, comma-separated "
                             "(e.g. bpe_untied,bpe_tied); default: the first of --arms")
    parser.add_argument("--seeds", default="3", help="a count (0..N-1) or a list like 0,4,7")
    parser.add_argument("--out", required=True, help="directory for the runs and the report")
    parser.add_argument("--report-only", action="store_true", help="do not train; report only")
    try:
        overrides, rest = config_lib.parse_overrides(argv)
    except config_lib.ConfigError as e:
        parser.error(str(e))
    args = parser.parse_args(rest)
    from kronjax.console import setup_logging  # here: keeps this change to main's lines

    setup_logging()  # the trainer's own handler: absl configured the root logger first
    try:
        variants = variants_lib.load(args.config)
        arms, seeds = parse_arms(args.arms, variants), parse_seeds(args.seeds)
        refs = parse_arms(args.reference, variants) if args.reference else arms[:1]
        if bad := [r for r in refs if r not in arms]:
            raise ValueError(f"--reference {bad} must be among --arms {arms}")
        cfg = config_lib.build_config(args.config, overrides)
        out = storage.as_path(args.out)
        if "log" in cfg and cfg.log.get("wandb") and not cfg.log.get("wandb_group"):
            cfg.log.wandb_group = out.name  # ... grouped as the comparison
        if isinstance(out, Path):
            out.mkdir(parents=True, exist_ok=True)
        if args.report_only:
            for a in arms:
                for s in seeds:
                    check_run_dir(out / run_name(a, s), run_config(cfg, a, s, variants))
        status = {} if args.report_only else run_all(cfg, arms, seeds, out, variants)
        if "preempted" in status.values():
            return 0
        summary = report(out, arms, seeds, cfg, {"config": args.config,
                                                 "overrides": [list(o) for o in overrides],
                                                 "runs": status}, refs, variants)
    except (ValueError, FileNotFoundError) as e:
        print(f"python -m kronjax.compare: error: {e}", file=sys.stderr)
        return 2  # bad input: a setting, an arm, a run made with another config
    print(summary["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
