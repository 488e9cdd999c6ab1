"""kronjax.compile_cache: where train.compile_cache points jax's persistent cache; a tiny run
fills it, and a second process trains from it (cache hits, the same losses).

The suite runs with KRONJAX_COMPILE_CACHE=off (conftest); these tests name their directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import pytest

from kronjax import compare
from kronjax import compile_cache as cc
from kronjax import config as config_lib
from kronjax.errors import UserError

HOME_CACHE = str(Path.home() / ".cache" / "kronjax" / "xla")


@pytest.mark.parametrize("setting, workdir, env, want", [
    ("", "runs/x", {}, HOME_CACHE),
    ("", "gs://bkt/runs/x", {}, "gs://bkt/.cache/kronjax/xla"),
    ("", "gs://bkt/runs/x", {"JAX_COMPILATION_CACHE_DIR": "/j"}, "/j"),
    ("", "runs/x", {"KRONJAX_COMPILE_CACHE": "off", "JAX_COMPILATION_CACHE_DIR": "/j"}, None),
    ("", "runs/x", {"KRONJAX_COMPILE_CACHE": "/k"}, "/k"),
    ("/mine", "runs/x", {"KRONJAX_COMPILE_CACHE": "off"}, "/mine"),
    ("gs://other/xla", "runs/x", {}, "gs://other/xla"),
    ("off", "gs://bkt/x", {"JAX_COMPILATION_CACHE_DIR": "/j"}, None),
    ("None", "runs/x", {}, None),
    ("~/xla", "runs/x", {}, str(Path.home() / "xla")),
])
def test_resolve(setting: str, workdir: str, env: dict[str, str], want: str | None) -> None:
    assert cc.resolve(setting, workdir, env) == want


def test_bad_settings_and_configs_older_than_the_key() -> None:
    with pytest.raises(UserError, match="only local directories and gs://"):
        cc.resolve("s3://bucket/xla", None, {})
    with pytest.raises(UserError, match="must be a string"):
        cc.setting_of(ml_collections.ConfigDict({"train": {"compile_cache": 3}}))
    old = config_lib.build_config(config_lib.REPO_CONFIGS / "tiny.py", [])
    del old.train["compile_cache"]
    assert cc.setting_of(old) == ""
    # compare still recognises a finished run made before the key existed as the same run
    new = config_lib.build_config(config_lib.REPO_CONFIGS / "tiny.py",
                                  [("train.compile_cache", "off")])
    assert compare.config_diff(new, json.loads(config_lib.to_json(old))) == []


def test_use_sets_the_cache_for_the_run_and_restores_jax_settings(tmp_path: Path) -> None:
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache,
              jax.config.jax_persistent_cache_min_compile_time_secs)
    cfg = ml_collections.ConfigDict({"train": {"compile_cache": str(tmp_path / "xla")}})
    with cc.use(cfg, "runs/x") as used:
        assert used == str(tmp_path / "xla") == jax.config.jax_compilation_cache_dir
        assert jax.config.jax_persistent_cache_min_compile_time_secs == cc.MIN_COMPILE_S_LOCAL
    cfg.train.compile_cache = "off"
    with cc.use(cfg) as used:
        assert used is None and not jax.config.jax_enable_compilation_cache
    assert (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache,
            jax.config.jax_persistent_cache_min_compile_time_secs) == before


def _losses(workdir: Path) -> list[float]:
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_a_run_fills_the_cache_and_a_second_process_compiles_from_it(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kronjax.loop import train

    # The suite's fast-compiling XLA flags bring this 1-layer eval step under the 0.2 s a
    # program must take to be written: write every program, so the second process can hit.
    monkeypatch.setattr(cc, "MIN_COMPILE_S_LOCAL", 0.0)

    xla = tmp_path / "xla"
    overrides = {"data.dir": tiny_data, "train.steps": 3, "optim.warmup_steps": 1,
                 "train.batch_size": 4, "train.eval_every": 3, "train.checkpoint_every": 3,
                 "data.eval_batches": 1, "model.n_layer": 1, "model.block_size": 16,
                 "train.compile_cache": xla}
    cfg = config_lib.build_config(config_lib.REPO_CONFIGS / "tiny.py",
                                  [(k, str(v)) for k, v in overrides.items()])
    before = jax.config.jax_compilation_cache_dir  # the test run's own cache, or None
    train(cfg, tmp_path / "first", stop=lambda: False)
    written = cc.entries(xla)
    for program in ("jit_init_state", "jit_train_step", "jit_eval_step"):
        assert any(name.startswith(program + "-") for name in written), (program, written)
    assert jax.config.jax_compilation_cache_dir == before  # the run's setting ended with it

    env = {**os.environ, "JAX_LOG_COMPILES": "1"}  # jax then logs each cache hit
    second = subprocess.run(
        [sys.executable, "-m", "kronjax.train", "--config", str(config_lib.REPO_CONFIGS /
         "tiny.py"), "--workdir", str(tmp_path / "second"), "--quiet",
         *[f"--config.{k}={v}" for k, v in overrides.items()]],
        capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    for program in ("jit_init_state", "jit_train_step", "jit_eval_step"):
        assert f"Persistent compilation cache hit for '{program}'" in second.stderr, program
    assert set(written) <= set(cc.entries(xla))  # entries are kept, never rewritten
    assert _losses(tmp_path / "second") == _losses(tmp_path / "first")


def test_bench_startup_sees_the_trainers_first_step_line() -> None:
    """kronjax.bench startup times to this line: it must match what the trainer prints."""
    from kronjax import console
    from kronjax.bench import startup

    assert startup.FIRST_STEP.search(console.step_line(1, 40, {"loss": 6.2}, None))
    assert not startup.FIRST_STEP.search(console.step_line(10, 40, {"loss": 6.2}, None))
