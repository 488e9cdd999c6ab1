"""Checkpoints round-trip state, data position and metadata, and survive a killed save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kronjax.checkpoint import (
    Checkpointer,
    IncompatibleCheckpointError,
    check_compatible,
    install_sigterm_handler,
)

REPO = Path(__file__).resolve().parents[1]
META = {
    "arm": "kron",
    "vocab_fingerprint": "abc123",
    "model_shape": [2, 64, 4],
    "tokenizer": "sp:4k",
}


def make_state(seed: int = 0) -> dict[str, Any]:
    """A small train state: params, AdamW moments after one update, step."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"w_DxC": jax.random.normal(k1, (8, 4)), "b_C": jax.random.normal(k2, (4,))}
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
            "step": jnp.asarray(1, jnp.int32)}


def make_iter() -> grain.DatasetIterator:
    ds = grain.MapDataset.range(100).shuffle(seed=3).map(lambda x: x * 10).to_iter_dataset()
    return iter(ds)


def abstract_of(state: Any) -> Any:
    """The restore target a train loop would build: shapes, dtypes, shardings."""
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def assert_trees_equal(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_roundtrip_state_iterator_meta(tmp_path: Path) -> None:
    state = make_state()
    it = make_iter()
    seen = [next(it) for _ in range(5)]
    donated = jax.tree.map(jnp.copy, state)
    with Checkpointer(tmp_path / "ckpt", save_every=1) as ckpt:
        assert ckpt.latest_step() is None and ckpt.read_meta() is None
        assert ckpt.save(5, donated, it, META)
        # The async save has copied the arrays off the device before returning,
        # so the train step may donate (delete) them while the write runs.
        for leaf in jax.tree.leaves(donated):
            leaf.delete()
    expected_next = [next(it) for _ in range(7)]

    # A fresh manager, as after a restart.
    with Checkpointer(tmp_path / "ckpt", save_every=1) as ckpt:
        assert ckpt.latest_step() == 5
        assert ckpt.read_meta() == META
        target = abstract_of(state)
        it2 = make_iter()
        restored, meta = ckpt.restore(None, target, it2)
    assert meta == META
    assert_trees_equal(restored, state)
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert leaf.sharding == want.sharding
    assert [next(it2) for _ in range(7)] == expected_next
    assert not set(expected_next) & set(seen)


def test_restore_state_only_and_relative_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # orbax's tensorstore needs absolute paths; we resolve them
    state = make_state()
    with Checkpointer("rel/ckpt", save_every=1, async_save=False) as ckpt:
        ckpt.save(1, state, None, {"note": "no data"})
        restored, meta = ckpt.restore(1, state, None)
        assert meta == {"note": "no data"}
        assert_trees_equal(restored, state)
        with pytest.raises(FileNotFoundError, match="no data iterator"):
            ckpt.restore(1, state, make_iter())
    assert (tmp_path / "rel" / "ckpt" / "1").is_dir()


def test_check_compatible_accepts_json_equal_values() -> None:
    check_compatible(META, {**META, "model_shape": (2, 64, 4), "other": 1})


def test_check_compatible_names_each_mismatch() -> None:
    current = {**META, "arm": "bpe_tied", "vocab_fingerprint": "zzz"}
    with pytest.raises(IncompatibleCheckpointError) as info:
        check_compatible(META, current)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "arm: checkpoint has 'kron', current config has 'bpe_tied'" in msg
    assert "vocab_fingerprint: checkpoint has 'abc123', current config has 'zzz'" in msg
    assert "model_shape" not in msg and "tokenizer" not in msg
    assert "--workdir" in msg and "config that wrote this checkpoint" in msg


def test_check_compatible_missing_key_is_a_mismatch() -> None:
    saved = {k: v for k, v in META.items() if k != "tokenizer"}
    with pytest.raises(IncompatibleCheckpointError, match="tokenizer: checkpoint has '<missing>'"):
        check_compatible(saved, META)


def test_save_cadence_force_and_max_to_keep(tmp_path: Path) -> None:
    state, it = make_state(), make_iter()
    with Checkpointer(tmp_path, save_every=2, max_to_keep=2) as ckpt:
        saved = [s for s in range(1, 8) if ckpt.save(s, state, it, {"step": s})]
        assert saved == [2, 4, 6]
        assert ckpt.save(7, state, it, {"step": 7}, force=True)  # e.g. preemption / end of run
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["6", "7"]


def test_existing_step_is_kept_and_older_step_refused(tmp_path: Path) -> None:
    it = make_iter()
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        assert ckpt.save(3, make_state(0), it, {"run": "first"})
        assert not ckpt.save(3, make_state(1), it, {"run": "second"}, force=True)
        with pytest.raises(ValueError, match="behind the newer step 3"):
            ckpt.save(2, make_state(1), it, {"run": "second"}, force=True)
        restored, meta = ckpt.restore(3, make_state(0), None)
    assert meta == {"run": "first"}
    assert_trees_equal(restored, make_state(0))


def test_bad_input_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="save_every"):
        Checkpointer(tmp_path, save_every=0)
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        with pytest.raises(TypeError, match="grain iterator"):
            ckpt.save(1, make_state(), iter(range(3)), {})
        with pytest.raises(TypeError, match="JSON-serializable"):
            ckpt.save(1, make_state(), None, {"x": object()})
        with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
            ckpt.restore(None, make_state(), None)
        ckpt.save(1, make_state(), None, {})
        with pytest.raises(FileNotFoundError, match=r"available: \[1\]"):
            ckpt.restore(9, make_state(), None)
    assert ckpt.latest_step() == 1


KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import grain, jax.numpy as jnp
    from kronjax.checkpoint import Checkpointer

    class DiesInSave:
        # Looks like a grain iterator; the process is SIGKILLed while orbax is
        # writing step 4 (after its tmp directory exists).
        def get_state(self):
            os.kill(os.getpid(), signal.SIGKILL)
        def set_state(self, state):
            pass

    ckpt = Checkpointer(sys.argv[1], save_every=2)
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    next(it)
    ckpt.save(2, {"w": jnp.full((16, 16), 2.0)}, it, {"step": 2})
    ckpt.wait()
    ckpt.save(4, {"w": jnp.full((16, 16), 4.0)}, DiesInSave(), {"step": 4})
    print("unreachable")
    """
)


def test_killed_save_resumes_from_previous_step(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    assert leftovers and leftovers[0].startswith("4."), sorted(p.name for p in tmp_path.iterdir())

    target = {"w": jnp.zeros((16, 16))}
    with Checkpointer(tmp_path, save_every=2) as ckpt:
        assert ckpt.latest_step() == 2
        assert ckpt.all_steps() == [2]
        it = iter(grain.MapDataset.range(100).to_iter_dataset())
        state, meta = ckpt.restore(None, target, it)
        assert meta == {"step": 2}
        assert float(state["w"][0, 0]) == 2.0
        assert next(it) == 1
        assert ckpt.save(4, {"w": jnp.full((16, 16), 4.0)}, it, {"step": 4})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 4]
        state, meta = ckpt.restore(4, target, None)
    assert meta == {"step": 4} and float(state["w"][0, 0]) == 4.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "4"]


def test_sigterm_sets_flag_and_uninstalls() -> None:
    before = signal.getsignal(signal.SIGTERM)
    stop = install_sigterm_handler()
    try:
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop()
    finally:
        stop.uninstall()  # type: ignore[attr-defined]
    assert signal.getsignal(signal.SIGTERM) is before


def test_no_preemption_in_single_process(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, save_every=10) as ckpt:
        assert not ckpt.reached_preemption(3)
        assert not ckpt.should_save(3) and ckpt.should_save(10)
