"""The tokenizer-freedom experiment's tables: per scenario and arm, bits per byte under the
source tokenizer, zero-shot and fine-tuned, with 95% paired-t intervals over seeds.

Gaps are paired by seed: zero-shot - source (what the swap costs at once), and fine-tuned -
the control's fine-tuned (`self`: the same model given the same extra steps under its own
tokenizer), so the fine-tune's own gain is not credited to the new tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kronjax import stats

CONTROL = {"to4k": "self16k", "self16k": "self16k"}  # every other scenario: "self"


def read_results(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """{(scenario, run): record} of a results.jsonl (empty if there is none)."""
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["scenario"], r["run"]): r for r in records}


def _by_seed(records: Sequence[Mapping[str, Any]], key: str) -> dict[int, float]:
    return {int(r["run"].rsplit("_s", 1)[1]): float(r[key]) for r in records if key in r}


def summarise(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """{scenario: {arm: numbers}} (module docstring)."""
    groups: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for r in records:
        groups.setdefault(r["scenario"], {}).setdefault(r["arm"], []).append(r)
    out: dict[str, Any] = {}
    for scenario, arms in groups.items():
        control = CONTROL.get(scenario, "self")
        out[scenario] = {}
        for arm, rs in sorted(arms.items()):
            src, zero = _by_seed(rs, "val_bpb_source"), _by_seed(rs, "val_bpb_zero_shot")
            row: dict[str, Any] = {
                "seeds": sorted(src), "vocab_new": rs[0]["vocab_new"],
                "new_tokens": rs[0]["new_tokens"], "source": stats.mean_std(list(src.values())),
                "zero_shot": stats.mean_std(list(zero.values())),
                "zero_shot_minus_source": stats.paired(src, zero)}
            tuned = _by_seed(rs, "val_bpb_finetuned")
            ctrl = _by_seed(groups.get(control, {}).get(arm, []), "val_bpb_finetuned")
            if tuned:
                row["finetuned"] = stats.mean_std(list(tuned.values()))
                row["finetune_steps"] = rs[0].get("finetune_steps")
            if tuned and set(tuned) & set(ctrl) and scenario != control:
                row["finetuned_minus_control"] = stats.paired(ctrl, tuned)
            out[scenario][arm] = row
    return out


def _pm(d: Mapping[str, Any]) -> str:
    return "-" if d.get("mean") is None else (
        f"{d['mean']:.4f}" + (f" ± {d['std']:.4f}" if d.get("std") is not None else ""))


def _gap(g: Mapping[str, Any] | None) -> str:
    if not g:
        return "-"
    ci = g.get("ci95")
    return f"{g['diff']:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")


def to_markdown(summary: Mapping[str, Any]) -> str:
    lines = []
    for scenario, arms in summary.items():
        lines += [f"### {scenario}", "",
                  "| arm | seeds | new vocab (new ids) | source bpb | zero-shot bpb "
                  "| zero-shot − source (95% CI) | fine-tuned bpb "
                  "| fine-tuned − control (95% CI) |",
                  "|---|---|---|---|---|---|---|---|"]
        for arm, row in arms.items():
            lines.append(
                f"| {arm} | {len(row['seeds'])} | {row['vocab_new']} ({row['new_tokens']}) "
                f"| {_pm(row['source'])} | "
                f"{_pm(row['zero_shot'])} | {_gap(row['zero_shot_minus_source'])} | "
                f"{_pm(row.get('finetuned', {}))} | {_gap(row.get('finetuned_minus_control'))} |")
        lines.append("")
    return "\n".join(lines)
