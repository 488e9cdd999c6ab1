"""compare: statistics on fabricated metrics, and skip / resume on real tiny runs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_runs
from scipy import stats

import kronjax.loop as train_lib
from kronjax import compare
from kronjax import config as config_lib
from kronjax import stats as kstats
from kronjax.metrics import read_metrics


def write_metrics(path: Path, records: list[dict]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def fake_run(final_val: float, steps: int = 300, eval_every: int = 100) -> list[dict]:
    """Loss falling linearly to final_val + the val curve at eval steps; input_norm drifting."""
    recs = [{"step": 0, "params_total": 1}]
    for s in range(1, steps + 1):
        r = {"step": s, "loss": final_val + (steps - s) / steps, "input_norm": 5.0 + s / steps}
        if s % eval_every == 0:
            r.update(val_loss=final_val + (steps - s) / steps, val_bpb=(final_val + 0.1) / 2)
        recs.append(r)
    return recs


# -- pure pieces ---------------------------------------------------------------------------------
def test_read_metrics_keeps_the_last_record_per_step(tmp_path: Path) -> None:
    write_metrics(tmp_path, [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0},
                             {"step": 2, "loss": 7.0}, {"step": 3, "loss": 6.0}])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # cut off by a crash
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in recs] == [(1, 9.0), (2, 7.0), (3, 6.0)]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_welch_interval_matches_scipy() -> None:
    a, b = [3.0, 3.2, 3.4], [2.9, 3.0, 3.1, 3.05]
    g = kstats.welch(a, b)
    assert g["diff"] == pytest.approx(np.mean(b) - np.mean(a))
    ref = stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    assert g["ci95"] == pytest.approx([ref.low, ref.high])
    assert "Welch" in g["method"]
    assert kstats.welch([1.0], [2.0, 3.0])["ci95"] is None


def test_t_table_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    for df in (1, 7, 30, 60, 120):
        assert kstats.t_table(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3), df
    for df in (1.5, 2.5, 13.3, 45, 200):  # between tabled df: the lower df, a wider interval
        lower = max(k for k in kstats.T_TABLE if k <= df)
        assert kstats.t_table(df) == pytest.approx(stats.t.ppf(0.975, lower), abs=1e-3)
        assert kstats.t_table(df) > stats.t.ppf(0.975, df), df
    assert kstats.t_table(1e6) == pytest.approx(1.96, abs=1e-3)
    monkeypatch.setitem(sys.modules, "scipy", None)  # import scipy now raises ImportError
    t, how = kstats.t_quantile(4)
    assert t == 2.776 and "table" in how
    with pytest.raises(ValueError, match=">= 1"):
        kstats.t_table(0.5)


def test_steps_to_match_interpolates_between_evals() -> None:
    curve = [(100, 4.0), (200, 3.0), (300, 2.5)]
    m = kstats.steps_to_match(curve, 3.5, 300)
    assert m["step"] == pytest.approx(150) and m["ratio"] == pytest.approx(0.5)
    assert m["first_eval_step"] == 200 and m["exact"]
    first = kstats.steps_to_match(curve, 5.0, 300)
    assert first["step"] == 100 and not first["exact"] and "upper bound" in first["note"]
    assert kstats.steps_to_match(curve, 1.0, 300)["step"] is None


def test_parse_arguments() -> None:
    assert compare.parse_seeds("3") == [0, 1, 2]
    assert compare.parse_seeds("1,4,7") == [1, 4, 7]
    assert compare.parse_seeds("5,") == [5]
    with pytest.raises(ValueError):
        compare.parse_seeds("0")
    with pytest.raises(ValueError, match="valid arms"):
        compare.parse_arms("bpe_tied,kronn")


def test_report_on_fabricated_runs(tmp_path: Path) -> None:
    cfg = config_lib.build_config(config_lib.REPO_CONFIGS / "tiny.py",
                                  [("train.steps", "300"), ("train.eval_every", "100")])
    finals = {"bpe_tied": [3.0, 3.2, 3.4], "kron": [2.9, 3.0, 3.1]}
    for arm, vals in finals.items():
        for seed, v in enumerate(vals):
            recs = fake_run(v)
            recs.insert(300, {"step": 300, "val_loss": 99.0})  # repeated after a resume: stale
            write_metrics(tmp_path / f"{arm}_s{seed}", recs)
    s = compare.report(tmp_path, ["bpe_tied", "kron"], [0, 1, 2], cfg)
    assert s["arms"]["bpe_tied"]["val_loss"]["mean"] == pytest.approx(3.2)
    assert s["arms"]["bpe_tied"]["val_loss"]["std"] == pytest.approx(0.2)
    assert s["arms"]["kron"]["val_loss"]["mean"] == pytest.approx(3.0)
    assert s["arms"]["kron"]["val_loss"]["std"] == pytest.approx(0.1)
    assert s["arms"]["kron"]["val_bpb"]["mean"] == pytest.approx(1.55)
    gap = next(g for g in s["gaps"] if g["metric"] == "val_loss")
    assert gap["diff"] == pytest.approx(-0.2)
    lo, hi = gap["ci95"]
    assert lo < -0.2 < hi
    # paired per seed: -0.1, -0.2, -0.3 -> mean -0.2, sd 0.1, t_{0.975,2} = 4.303
    p = next(g for g in s["paired"] if g["metric"] == "val_loss")
    assert p["per_seed"] == pytest.approx({"0": -0.1, "1": -0.2, "2": -0.3})
    half = stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)
    assert p["ci95"] == pytest.approx([-0.2 - half, -0.2 + half])
    assert s["per_seed"]["kron"]["val_loss"] == pytest.approx({"0": 2.9, "1": 3.0, "2": 3.1})
    # kron's mean val curve (300 steps, evals at 100/200/300: 3.67, 3.33, 3.0) reaches
    # bpe_tied's final 3.2 between steps 200 and 300: 200 + (3.333 - 3.2) / (1/3) * 100 = 240
    m = next(x for x in s["steps_to_match"] if x["arm"] == "kron")
    assert m["step"] == pytest.approx(240) and m["ratio"] == pytest.approx(0.8)
    md = (tmp_path / "summary.md").read_text()
    assert "3.2000 ± 0.2000" in md and "Welch t" in md and "paired t" in md
    assert "| kron − bpe_tied | val_loss | -0.2000 |" in md
    assert json.loads((tmp_path / "summary.json").read_text())["reference_arm"] == "bpe_tied"
    for png in ("loss_curves.png", "norm_drift.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    two = compare.report(tmp_path, ["bpe_tied", "kron"], [0, 1, 2], cfg,
                         references=["kron", "bpe_tied"])
    assert {(g["arm"], g["reference"]) for g in two["paired"]} == {("bpe_tied", "kron"),
                                                                    ("kron", "bpe_tied")}
    with pytest.raises(ValueError, match="reference"):
        compare.report(tmp_path, ["bpe_tied", "kron"], [0, 1, 2], cfg, references=["kron_tied"])
    write_metrics(tmp_path / "kron_s3", fake_run(3.0)[:200])
    with pytest.raises(ValueError, match="not finished"):
        compare.report(tmp_path, ["kron"], [3], cfg)


def test_a_run_made_with_another_config_is_refused(tmp_path: Path) -> None:
    cfg = config_lib.build_config(config_lib.REPO_CONFIGS / "tiny.py", [])
    run = tmp_path / "kron_s0"
    run.mkdir()
    other = compare.run_config(cfg, "kron", 0)
    other.optim.peak_lr = 0.5
    (run / "config.json").write_text(config_lib.to_json(other))
    with pytest.raises(compare.RunMismatchError, match="optim.peak_lr"):
        compare.run_all(cfg, ["kron"], [0], tmp_path)
    progress_only = compare.run_config(cfg, "kron", 0)
    progress_only.train.progress = not cfg.train.progress
    assert compare.config_diff(progress_only, json.loads(config_lib.to_json(cfg))) == []


# -- real runs -------------------------------------------------------------------------------------
def test_resume_then_skip(tmp_path_factory: pytest.TempPathFactory,
                          monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    runs = tiny_runs.get(tmp_path_factory)
    assert runs.status == {"bpe_tied_s0": "trained", "kron_s0": "resumed"}
    raw = [json.loads(x) for x in (runs.kron / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in raw]
    assert steps == list(range(0, tiny_runs.STEPS + 1)), "resumed at step 6, nothing redone"
    assert raw[:len(runs.partial)] == runs.partial  # the first five steps were not retrained
    assert compare.is_finished(runs.kron, tiny_runs.STEPS)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train_lib, "train", no_training)
    args = ["--config", str(config_lib.REPO_CONFIGS / "tiny.py"), "--arms", "bpe_tied,kron",
            "--seeds", "1", "--out", str(runs.out)]
    args += [f"--config.{k}={v}" for k, v in runs.overrides]
    assert compare.main(args) == 0
    out = capsys.readouterr().out
    assert "| kron | 1 |" in out and "needs >= 2 seeds" in out
    summary = json.loads((runs.out / "summary.json").read_text())
    assert set(summary["runs"].values()) == {"skipped (finished)"}
    assert not math.isnan(summary["arms"]["kron"]["val_bpb"]["mean"])
    assert compare.main(args + ["--config.train.steps=11"]) == 2
    assert "different config" in capsys.readouterr().err
