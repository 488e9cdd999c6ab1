"""compare's arm variants (kronjax/variants.py) and its per-evaluation paired gap curve.

No training: configs are the tiny one plus a get_variants() written to tmp_path, and runs are
fabricated metrics records, so the whole file takes about a second beyond imports.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from kronjax import compare
from kronjax import config as config_lib
from kronjax import stats as kstats
from kronjax import variants as variants_lib

STEPS, EVAL_EVERY = 300, 100


def write_config(tmp_path: Path, variants: str) -> Path:
    """The tiny config with 300 steps, evaluated every 100, and the given get_variants body."""
    path = tmp_path / "with_variants.py"
    path.write_text(textwrap.dedent(f"""\
        from kronjax.config import load_config_file, REPO_CONFIGS

        def get_config():
            cfg = load_config_file(REPO_CONFIGS / "tiny.py")
            cfg.train.steps = {STEPS}
            cfg.train.eval_every = {EVAL_EVERY}
            return cfg

        def get_variants():
            return {variants}
        """))
    return path


def fake_run(vals: dict[int, float]) -> list[dict]:
    """Step-0 parameter counts, then a val_loss / val_bpb record at each eval step."""
    recs: list[dict] = [{"step": 0, "params_input_side": 7, "params_total": 70}]
    for step, v in sorted(vals.items()):
        recs.append({"step": step, "loss": v, "val_loss": v, "val_bpb": v / 2})
    return recs


def write_run(out: Path, name: str, cfg, vals: dict[int, float]) -> None:
    run = out / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fake_run(vals)))
    (run / "config.json").write_text(config_lib.to_json(cfg))


def test_variants_load_apply_and_refuse(tmp_path: Path) -> None:
    good = write_config(tmp_path, '{"kron_1l": {"model.arm": "kron", "model.n_layer": 1}}')
    v = variants_lib.load(good)
    assert v == {"kron_1l": {"model.arm": "kron", "model.n_layer": 1}}
    base = config_lib.build_config(good, [("optim.peak_lr", "0.5")])
    cfg = compare.run_config(base, "kron_1l", 3, v)
    assert (cfg.model.arm, cfg.model.n_layer, cfg.seed, cfg.optim.peak_lr) == ("kron", 1, 3, 0.5)
    assert base.model.n_layer == 2, "the base config is not changed"
    plain = compare.run_config(base, "bpe_tied", 3, v)
    assert (plain.model.arm, plain.model.n_layer) == ("bpe_tied", 2)
    assert compare.parse_arms("bpe_tied, kron_1l", v) == ["bpe_tied", "kron_1l"]
    with pytest.raises(ValueError, match="kron_1l"):  # the message lists the variants
        compare.parse_arms("kron_2l", v)
    with pytest.raises(ValueError, match="get_variants"):
        compare.parse_arms("kron_1l")
    flags = "--config.model.arm=kron --config.model.n_layer=1"
    assert variants_lib.train_flags(v["kron_1l"]) == flags
    assert variants_lib.load(config_lib.REPO_CONFIGS / "tiny.py") == {}
    bad = {"not an arm's": '{"kron": {"model.arm": "kron"}}',
           "model.arm": '{"k": {"model.n_layer": 1}}',
           "unknown config key": '{"k": {"model.arm": "kron", "model.n_layers": 1}}',
           "expects int": '{"k": {"model.arm": "kron", "model.n_layer": "deep"}}',
           "is a bool": '{"k": {"model.arm": "kron", "model.bias": 1}}',
           "train.steps": '{"k": {"model.arm": "kron", "train.steps": 9}}',
           "data.source": '{"k": {"model.arm": "kron", "data.source": "x"}}',
           "must return": '["kron"]'}
    for i, (message, body) in enumerate(bad.items()):
        sub = tmp_path / str(i)
        sub.mkdir()
        with pytest.raises(config_lib.ConfigError, match=message):
            variants_lib.load(write_config(sub, body))


def test_a_variant_run_is_the_single_run_with_its_flags(tmp_path: Path) -> None:
    """The run a variant trains has the config `train --config F --config.k=v ...` trains, so
    compare accepts such a run directory; one made with other settings is refused."""
    path = write_config(tmp_path, '{"kron_1l": {"model.arm": "kron", "model.n_layer": 1}}')
    v = variants_lib.load(path)
    single = config_lib.build_config(path, [("model.arm", "kron"), ("model.n_layer", "1"),
                                            ("seed", "2"), ("train.progress", "True")])
    run = tmp_path / "out" / "kron_1l_s2"
    run.mkdir(parents=True)
    (run / "config.json").write_text(config_lib.to_json(single))
    base = config_lib.build_config(path, [])
    compare.check_run_dir(run, compare.run_config(base, "kron_1l", 2, v))
    with pytest.raises(compare.RunMismatchError, match="model.n_layer"):
        compare.check_run_dir(run, compare.run_config(base, "kron", 2, v))


def test_paired_curve_matches_scipy_at_every_step() -> None:
    rng = np.random.default_rng(0)
    steps = [25, 50, 75, 100]
    a = {s: [(t, 6 - t / 50 + rng.normal(0, 0.05)) for t in steps] for s in range(3)}
    b = {s: [(t, v - 0.2 + t / 400 + rng.normal(0, 0.02)) for t, v in a[s]] for s in range(3)}
    b[3] = [(t, 0.0) for t in steps]  # a seed only one arm has: left out of the pairing
    b[0] = b[0] + [(110, 1.0)]         # a step only one seed has: left out
    pts = kstats.paired_curve(a, b)
    assert [p["step"] for p in pts] == steps
    for p, t in zip(pts, steps):
        xa = [dict(a[s])[t] for s in range(3)]
        xb = [dict(b[s])[t] for s in range(3)]
        assert p["diff"] == pytest.approx(np.mean(np.subtract(xb, xa)))
        ci = stats.ttest_rel(xb, xa).confidence_interval(0.95)
        assert p["ci95"] == pytest.approx([ci.low, ci.high])
        assert p["n"] == 3 and set(p["per_seed"]) == {"0", "1", "2"}
    with pytest.raises(ValueError, match="no seed in common"):
        kstats.paired_curve({0: a[0]}, {1: a[1]})


def test_report_with_a_variant_and_the_gap_curve(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, '{"kron_1l": {"model.arm": "kron", "model.n_layer": 1}}')
    v = variants_lib.load(path)
    base = config_lib.build_config(path, [])
    out = tmp_path / "out"
    table = {0: {100: 5.0, 200: 4.5, 300: 4.2}, 1: {100: 5.2, 200: 4.6, 300: 4.3}}
    gaps = {0: {100: -0.3, 200: -0.1, 300: 0.05}, 1: {100: -0.5, 200: -0.2, 300: 0.15}}
    for seed in (0, 1):
        write_run(out, f"bpe_tied_s{seed}", compare.run_config(base, "bpe_tied", seed, v),
                  table[seed])
        write_run(out, f"kron_1l_s{seed}", compare.run_config(base, "kron_1l", seed, v),
                  {t: table[seed][t] + gaps[seed][t] for t in table[seed]})
    args = ["--config", str(path), "--arms", "bpe_tied,kron_1l", "--seeds", "2", "--out",
            str(out), "--report-only"]
    assert compare.main(args) == 0
    md = capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert s["variants"] == {"kron_1l": {"model.arm": "kron", "model.n_layer": 1}}
    assert s["total_params"] == {"bpe_tied": 70, "kron_1l": 70}
    curve = next(g for g in s["gap_curves"] if g["metric"] == "val_loss")
    assert (curve["arm"], curve["reference"]) == ("kron_1l", "bpe_tied")
    tokens_per_step = base.train.batch_size * base.model.block_size
    assert [p["tokens"] for p in curve["points"]] == [t * tokens_per_step
                                                      for t in (100, 200, 300)]
    for p in curve["points"]:
        d = [gaps[0][p["step"]], gaps[1][p["step"]]]
        half = stats.t.ppf(0.975, 1) * np.std(d, ddof=1) / np.sqrt(2)
        assert p["diff"] == pytest.approx(np.mean(d))
        assert p["ci95"] == pytest.approx([np.mean(d) - half, np.mean(d) + half])
    last = next(g for g in s["paired"] if g["metric"] == "val_loss")
    assert last["diff"] == pytest.approx(curve["points"][-1]["diff"]), "last point = final gap"
    assert "`kron_1l`: `--config.model.arm=kron --config.model.n_layer=1`" in md
    assert f"| kron_1l − bpe_tied | 200 | {200 * tokens_per_step:,} | -0.1500 |" in md
    assert (out / "gap_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    alone = compare.report(out, ["kron_1l"], [0, 1], base, variants=v)  # no pair, no gap plot
    assert alone["gap_curves"] == [] and "gap_curve.png" not in alone["plots"]
    assert compare.main(args[:3] + ["bpe_tied,kron_2l"] + args[4:]) == 2
    assert "kron_1l" in capsys.readouterr().err  # names the valid variants


def test_token_tick_labels() -> None:
    from kronjax import plots

    assert [plots._tokens(x) for x in (0, 512, 51_200, 800_000, 1_200_000)] == [
        "0", "512", "51.2k", "800k", "1.2M"]
