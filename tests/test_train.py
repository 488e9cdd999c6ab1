"""The trainer end to end on a tiny config: resume equals uninterrupted, refusals, SIGTERM."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kronjax import checkpoint as ckpt
from kronjax import config as config_lib
from kronjax import loop
from kronjax import run as run_lib
from kronjax import step as step_mod
from kronjax.model import GPT, GPTConfig
from kronjax.vocab import ByteVocab

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.py"


def tiny_cfg(data_dir: Path, **overrides: object):
    base = {"data.dir": str(data_dir), "train.steps": 8, "train.checkpoint_every": 4,
            "train.eval_every": 4, "train.batch_size": 4, "optim.warmup_steps": 2}
    base.update(overrides)
    return config_lib.build_config(TINY, [(k, str(v)) for k, v in base.items()])


def losses(workdir: Path) -> dict[int, float]:
    """Last record per step (a resumed run may repeat steps after its checkpoint)."""
    out: dict[int, float] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def data_dir(tiny_data: Path) -> Path:
    return tiny_data


@pytest.fixture(scope="module")
def full_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 8-step kron run: the reference the resumed runs must equal."""
    wd = tmp_path_factory.mktemp("full")
    result = loop.train(tiny_cfg(data_dir), wd, stop=lambda: False)
    assert result.step == 8 and not result.preempted
    return wd


def test_unknown_config_key_names_nearest() -> None:
    with pytest.raises(config_lib.ConfigError, match=r"'train\.step'.*train\.steps"):
        config_lib.build_config(TINY, [("train.step", "3")])
    with pytest.raises(config_lib.ConfigError, match="model.arm"):
        config_lib.build_config(TINY, [("model.amr", "kron")])
    with pytest.raises(config_lib.ConfigError, match="expects int"):
        config_lib.build_config(TINY, [("train.steps", "many")])
    proc = subprocess.run([sys.executable, "-m", "kronjax.train", "--config", str(TINY),
                           "--config.optim.peak_l=1"], capture_output=True, text=True)
    assert proc.returncode != 0 and "optim.peak_lr" in proc.stderr


def test_first_loss_is_ln_vocab_and_loss_falls(full_run: Path) -> None:
    meta = json.loads((full_run / "config.json").read_text())
    recs = losses(full_run)
    vocab = 512  # tiny config's sentencepiece size, already a multiple of 64
    assert meta["data"]["sp_vocab_size"] == vocab
    assert abs(recs[1] - math.log(vocab)) < 0.15
    assert recs[8] < recs[1] - 0.3
    lines = [json.loads(x) for x in (full_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert all(r["val_bpb"] > 0 for r in evals)
    step_rec = [r for r in lines if r.get("step") == 3][0]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "input_norm"} <= set(step_rec)


def test_resume_gives_identical_losses(full_run: Path, data_dir: Path, tmp_path: Path) -> None:
    """Stopped after step 3 (off the save cadence): the stop saves step 3, and the resumed
    run's losses equal the uninterrupted run's step by step, bit for bit."""
    stops = iter([False, False, True])
    first = loop.train(tiny_cfg(data_dir), tmp_path, stop=lambda: next(stops, False))
    assert first.preempted and first.step == 3
    assert ckpt.Checkpointer(tmp_path / "checkpoints", save_every=4).all_steps() == [3]
    second = loop.train(tiny_cfg(data_dir), tmp_path, stop=lambda: False)
    assert second.step == 8
    assert losses(tmp_path) == losses(full_run)


TOK_VOCAB = 512


def _byte_model(data_dir: Path, arm: str) -> tuple[Any, GPT]:
    """The tiny config for `arm`, one block (what these tests compare is per block), with a
    512-id byte vocabulary (no tokenizer needed)."""
    cfg = tiny_cfg(data_dir, **{"model.arm": arm, "model.n_layer": 1})
    mcfg = run_lib.model_config(cfg, TOK_VOCAB)
    vocab = ByteVocab.from_bytes([bytes([i % 256]) * (1 + i % 5) for i in range(TOK_VOCAB)],
                                 mcfg.pos_dim).pad_to(mcfg.vocab_size)
    return cfg, GPT(mcfg, vocab)


@pytest.mark.parametrize("arm", ["kron", "kron_tied"])
def test_grad_accumulation_equals_one_big_batch(data_dir: Path, arm: str) -> None:
    """Four micro-batches take the step of one big batch. kron_tied computes its codec table
    and the table's backward once per step then, not per micro-batch: same step again."""
    cfg, model = _byte_model(data_dir, arm)
    mcfg = model.config
    # Plain SGD makes the update the averaged gradient itself (Adam's first step would
    # normalise away the comparison by amplifying round-off in near-zero gradients).
    import optax
    schedule = optax.constant_schedule(1.0)
    tx = optax.sgd(schedule)
    state = step_mod.init_state(model, tx, 0, mcfg.block_size)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, TOK_VOCAB, (8, mcfg.block_size + 1)).astype(np.int32)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:]}
    step = jax.jit(lambda s, b, share=True: step_mod.train_step(
        s, b, jax.random.key(0), model=model, tx=tx, schedule=schedule, share_table=share),
        static_argnums=2)
    one, m1 = step(state, step_mod.split_micro(batch, 1))
    four, m4 = step(state, step_mod.split_micro(batch, 4))
    runs = [(four, m4)]
    if arm == "kron_tied":
        assert step_mod.table_once_per_step(model, 4) and not step_mod.table_once_per_step(model, 1)
        runs.append(step(state, step_mod.split_micro(batch, 4), False))  # table per micro-batch
    for other, m in runs:
        np.testing.assert_allclose(float(m1["loss"]), float(m["loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(m1["grad_norm"]), float(m["grad_norm"]), rtol=1e-4)
        for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(other["params"])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="not divisible by grad_accum"):
        step_mod.split_micro(batch, 3)


@pytest.mark.parametrize("arm", ["bpe_tied", "kron_tied", "kron"])
def test_fused_head_loss_step_equals_unfused(data_dir: Path, arm: str) -> None:
    """train.ce_chunk > 0 (head + cross-entropy in chunks, GPT.loss) takes the same AdamW
    step as materialising the logits; the plan picks it up from the config."""
    cfg, model = _byte_model(data_dir, arm)
    mcfg = model.config
    from kronjax import optim
    tx, schedule = optim.from_config(cfg)
    assert run_lib.make_plan(cfg, model, tx).ce_chunk == cfg.train.ce_chunk > 0
    state = step_mod.init_state(model, tx, 0, mcfg.block_size)
    ids = np.random.default_rng(1).integers(0, TOK_VOCAB, (4, mcfg.block_size + 1))
    batch = step_mod.split_micro({"inputs": ids[:, :-1].astype(np.int32),
                               "targets": ids[:, 1:].astype(np.int32)}, 2)

    def step(chunk: int):
        return jax.jit(lambda s, b: step_mod.train_step(s, b, jax.random.key(0), model=model,
                                                     tx=tx, schedule=schedule,
                                                     ce_chunk=chunk))(state, batch)

    (s0, m0), (s1, m1) = step(0), step(16)
    np.testing.assert_allclose(float(m1["loss"]), float(m0["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m0["grad_norm"]), rtol=1e-4)
    # Adam's first step is about lr per element (3e-3 here): 1e-5 is round-off, not a
    # different gradient (a wrong one moves elements by a whole step)
    for a, b in zip(jax.tree.leaves(s0["params"]), jax.tree.leaves(s1["params"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


def test_ce_chunk_config_is_checked_and_off_under_vocab_parallel(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="train.ce_chunk must be an integer >= 0"):
        run_lib.ce_chunk_tokens(tiny_cfg(data_dir, **{"train.ce_chunk": -8}))
    cfg = tiny_cfg(data_dir, **{"mesh.vocab_parallel_ce": True, "model.arm": "bpe_tied"})
    model = GPT(run_lib.model_config(cfg, 512))
    from kronjax import optim
    tx, _ = optim.from_config(cfg)
    assert run_lib.make_plan(cfg, model, tx).ce_chunk == 0   # the shard_map CE needs logits


@pytest.mark.parametrize("override,key", [
    ({"model.arm": "bpe_tied"}, "arm"),
    ({"model.n_embd": 48}, "model_shape"),
    ({"model.pos_dim": 4}, "vocab_fingerprint"),
    ({"data.sp_vocab_size": 384}, "tokenizer_fingerprint"),
])
def test_incompatible_resume_is_refused(full_run: Path, data_dir: Path, tmp_path: Path,
                                        override: dict, key: str) -> None:
    import shutil
    wd = tmp_path / "run"
    shutil.copytree(full_run, wd)
    overrides = dict(override)
    if "data.sp_vocab_size" in overrides:  # another tokenizer needs its own prepared data
        overrides["data.dir"] = str(tmp_path / "data384")
    before = sorted(p.name for p in (wd / "checkpoints").iterdir())
    with pytest.raises(ckpt.IncompatibleCheckpointError, match=key):
        loop.train(tiny_cfg(data_dir, **overrides), wd, stop=lambda: False)
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == before


def test_changed_setting_resumes_logged_and_every_config_is_kept(
        full_run: Path, data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A resume with another learning rate overwrote config.json: the record of what trained
    the first steps was lost, and nothing said the setting had changed."""
    import shutil
    wd = tmp_path / "run"
    shutil.copytree(full_run, wd)
    first = json.loads((wd / "config.json").read_text())
    (wd / "config_history.jsonl").unlink()  # a workdir written before the history existed
    cfg = tiny_cfg(data_dir, **{"train.steps": 10, "optim.peak_lr": 0.02})
    with caplog.at_level("WARNING", logger="kronjax.run"):
        assert loop.train(cfg, wd, stop=lambda: False).step == 10
    assert "resuming with a changed setting: optim.peak_lr 0.01 -> 0.02" in caplog.text
    assert "resuming with a changed setting: train.steps 8 -> 10" in caplog.text
    history = [json.loads(x) for x in (wd / "config_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [None, 8] and history[0]["config"] == first
    assert history[1]["changed"] == {"optim.peak_lr": [0.01, 0.02], "train.steps": [8, 10]}
    assert json.loads((wd / "config.json").read_text())["optim"]["peak_lr"] == 0.02
    loop.train(cfg, wd, stop=lambda: False)  # the same config again: no new line
    assert len((wd / "config_history.jsonl").read_text().splitlines()) == 2


def test_interrupted_save_resumes_from_previous(full_run: Path, data_dir: Path,
                                                tmp_path: Path) -> None:
    """What a kill during the save of step 8 leaves behind is ignored; step 4 is resumed."""
    import shutil
    wd = tmp_path / "run"
    shutil.copytree(full_run, wd)
    ck = wd / "checkpoints"
    shutil.move(ck / "8", ck / "8.orbax-checkpoint-tmp")
    with ckpt.Checkpointer(ck, save_every=4) as opened:   # removes the stale tmp directory
        assert opened.latest_step() == 4
    assert not (ck / "8.orbax-checkpoint-tmp").exists()
    result = loop.train(tiny_cfg(data_dir), wd, stop=lambda: False)
    assert result.step == 8
    assert losses(wd) == losses(full_run)


def test_non_finite_loss_stops_and_keeps_last_good(data_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(data_dir, **{"optim.peak_lr": 1e12, "optim.grad_clip": 0.0,
                                "train.checkpoint_every": 1, "train.steps": 30})
    with pytest.raises(loop.NonFiniteLossError, match="last good checkpoint"):
        loop.train(cfg, tmp_path, stop=lambda: False)
    steps = ckpt.Checkpointer(tmp_path / "checkpoints", save_every=1).all_steps()
    bad = max(losses(tmp_path)) if losses(tmp_path) else None
    assert steps and (bad is None or max(steps) < bad + 1)
    last = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in last if "loss" in r)


def test_sigterm_saves_and_exits_zero(full_run: Path, data_dir: Path, tmp_path: Path) -> None:
    """A real SIGTERM to the CLI: exit 0 with a checkpoint; rerunning finishes identically."""
    args = [sys.executable, "-m", "kronjax.train", "--config", str(TINY), "--workdir",
            str(tmp_path), *[f"--config.{k}={v}" for k, v in {
                "data.dir": data_dir, "train.steps": 8, "train.checkpoint_every": 4,
                "train.eval_every": 4, "train.batch_size": 4, "optim.warmup_steps": 2}.items()]]
    # No compilation cache: the signal must land while the step compiles.
    env = {**os.environ, "KRONJAX_COMPILE_CACHE": "off", "JAX_COMPILATION_CACHE_DIR": ""}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.time() + 120
    metrics = tmp_path / "metrics.jsonl"
    # The step-0 line is written just before the step compiles (seconds): the signal lands
    # while the run is busy, and it must finish that step, save it and exit 0.
    while time.time() < deadline and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["preempted"] is True
    saved = ckpt.Checkpointer(tmp_path / "checkpoints", save_every=4).all_steps()
    assert saved and saved[-1] < 8
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert losses(tmp_path) == losses(full_run)


def test_sample_greedy_top_p_and_oov(full_run: Path, data_dir: Path) -> None:
    from kronjax import generate as sample
    from kronjax.run import Loaded, load_run
    run = load_run(full_run)
    assert run.step == 8 and run.model.config.arm == "kron"
    ids = run.tokenizer.encode("The function")
    greedy = sample.generate(run, ids, 6)
    assert greedy[:len(ids)] == ids and len(greedy) == len(ids) + 6
    assert sample.generate(run, ids, 6) == greedy
    # Greedy equals argmax of the model's own logits, recomputed independently.
    logits = run.model.apply({"params": run.params}, jnp.asarray([greedy[:-1]]))
    assert int(jnp.argmax(logits[0, -1])) == greedy[-1]
    a = sample.generate(run, ids, 6, temperature=0.7, top_p=0.9, seed=1)
    assert a == sample.generate(run, ids, 6, temperature=0.7, top_p=0.9, seed=1)
    prompt_ids, oov = sample.encode_prompt(run.tokenizer, "The {oov} function", "zorblax")
    assert oov is not None and oov[1] == b"zorblax"
    out = sample.generate(run, prompt_ids, 4, oov=oov)
    assert out[:len(prompt_ids)] == prompt_ids
    bpe = Loaded(GPT(GPTConfig(512, 32, 1, 2, 32, arm="bpe_tied")), None, run.tokenizer,
                        run.cfg, 0)
    with pytest.raises(ValueError, match="needs a Kronecker arm"):
        sample.generate(bpe, ids, 2, oov=oov)
    with pytest.raises(ValueError, match="exceeds the model's block_size"):
        sample.generate(run, ids, 1000)
    proc = subprocess.run([sys.executable, "-m", "kronjax.sample", "--workdir", str(full_run),
                           "--prompt", "The {oov} is", "--oov", "zorblax", "--tokens", "4"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The zorblax is")
