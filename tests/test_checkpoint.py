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

from kronjax.checkpoint import Checkpointer, IncompatibleCheckpointError, check_compatible
from kronjax.signals import install_sigterm_handler

REPO = Path(__file__).resolve().parents[1]
META = {
    "arm": "kron",
    "vocab_fingerprint": "abc123",
    "model_shape": [2, 64, 4],
    "tokenizer_fingerprint": "sp:4k",
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
    assert "model_shape" not in msg and "tokenizer_fingerprint" not in msg
    assert "--workdir" in msg and "config that wrote this checkpoint" in msg


def test_check_compatible_missing_key_is_a_mismatch() -> None:
    saved = {k: v for k, v in META.items() if k != "tokenizer_fingerprint"}
    with pytest.raises(IncompatibleCheckpointError,
                       match="tokenizer_fingerprint: checkpoint has '<missing>'"):
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


# -- unreadable checkpoints: the newest one that restores, the bad ones kept -------------------
def big_state(seed: int) -> dict[str, Any]:
    """Large enough that orbax writes the arrays to a data file of their own."""
    return {"w": jax.random.normal(jax.random.key(seed), (256, 256)),
            "b": jnp.arange(8.0) + seed, "step": jnp.asarray(seed, jnp.int32)}


def _largest_data_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.glob("state/**/d/*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def _truncate(step_dir: Path) -> None:
    f = _largest_data_file(step_dir)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _drop_state_item(step_dir: Path) -> None:
    import shutil

    shutil.rmtree(step_dir / "state")


def _empty_meta(step_dir: Path) -> None:
    (step_dir / "meta" / "metadata").write_bytes(b"")


def _flip_one_bit(step_dir: Path) -> None:
    f = _largest_data_file(step_dir)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))


CORRUPTIONS = {"truncated array file": _truncate, "missing state item": _drop_state_item,
               "empty meta file": _empty_meta, "one flipped bit": _flip_one_bit}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _two_steps(ck: Path) -> Any:
    """Steps 1 and 2 of big_state; returns the iterator position saved with step 1."""
    it = make_iter()
    with Checkpointer(ck, save_every=1) as c:
        next(it)
        c.save(1, big_state(1), it, {"step": 1})
        c.wait()
        position = it.get_state()
        next(it)
        c.save(2, big_state(2), it, {"step": 2})
    return position


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_unreadable_newest_step_restores_the_previous_and_keeps_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, corruption: str) -> None:
    """Each damage to step 2 gave a 36-151-line orbax traceback naming neither step nor path
    (or, for a flipped bit, silently restored a changed array); now step 1 is restored with a
    warning that names step 2 and its directory, and step 2's files stay as they are."""
    ck = tmp_path / "ckpt"
    position = _two_steps(ck)
    CORRUPTIONS[corruption](ck / "2")
    damaged = _files(ck / "2")
    with Checkpointer(ck, save_every=1) as c:
        it = make_iter()
        with caplog.at_level("WARNING", logger="kronjax.checkpoint"):
            state, meta = c.restore(None, abstract_of(big_state(0)), it)
        assert meta == {"step": 1}
        assert_trees_equal(state, big_state(1))
        assert it.get_state() == position
        assert f"checkpoint step 2 ({ck / '2'}) cannot be restored" in caplog.text
        assert "restored checkpoint step 1 instead of 2" in caplog.text
        assert _files(ck / "2") == damaged  # nothing deleted or rewritten
        # Training goes on from step 1: the next save moves the bad step out of orbax's
        # directory (so max_to_keep neither counts nor deletes it) and writes a good step 2.
        assert c.save(2, big_state(2), it, {"step": 2})
        c.wait()
        assert c.all_steps() == [1, 2]
    assert _files(tmp_path / "ckpt.unreadable" / "2") == damaged
    with Checkpointer(ck, save_every=1) as c:
        state, meta = c.restore(None, abstract_of(big_state(0)), make_iter())
    assert meta == {"step": 2}
    assert_trees_equal(state, big_state(2))


def test_no_restorable_step_is_one_error_naming_each(tmp_path: Path) -> None:
    from kronjax.checkpoint import UnreadableCheckpointError
    from kronjax.errors import UserError

    ck = tmp_path / "ckpt"
    _two_steps(ck)
    _flip_one_bit(ck / "2")
    _empty_meta(ck / "1")
    with Checkpointer(ck, save_every=1) as c:
        with pytest.raises(UnreadableCheckpointError) as info:
            c.restore(None, abstract_of(big_state(0)), make_iter())
        assert isinstance(info.value, UserError)
        lines = str(info.value).splitlines()
        assert lines[0] == f"no checkpoint in {ck} can be restored:"
        assert lines[1].startswith(f"  step 2 ({ck / '2'}): ChecksumMismatch: checksum mismatch")
        assert lines[2].startswith(f"  step 1 ({ck / '1'}): JSONDecodeError")
        with pytest.raises(UnreadableCheckpointError, match=rf"step 2 \({ck / '2'}\) cannot be "
                                                            "restored: ChecksumMismatch"):
            c.restore(2, abstract_of(big_state(0)), None)
        assert c.read_meta() == {"step": 2}  # the metadata alone is readable
        with pytest.raises(UnreadableCheckpointError, match=rf"step 1 \({ck / '1'}\) has "
                                                            "unreadable metadata: JSONDecodeE"):
            c.read_meta(1)
    assert sorted(p.name for p in ck.iterdir()) == ["1", "2"]


def test_checkpoint_without_checksums_still_restores(tmp_path: Path) -> None:
    """Steps saved before checksums existed restore as they did (not verified)."""
    import shutil

    ck = tmp_path / "ckpt"
    _two_steps(ck)
    shutil.rmtree(ck / "2" / "checksums")
    with Checkpointer(ck, save_every=1) as c:
        state, meta = c.restore(None, abstract_of(big_state(0)), None)
    assert meta == {"step": 2}
    assert_trees_equal(state, big_state(2))


# -- a failed save: one line, noticed at once, earlier steps untouched ----------------------
def test_describe_failure_names_the_os_error() -> None:
    import errno

    from kronjax.checkpoint import describe_failure

    assert describe_failure(OSError(errno.ENOSPC, "No space left on device")) == \
        "no space left on device (ENOSPC)"
    tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing "w/0.0" in OCDBT database: '
                             "Failed to write 903859 bytes to file 5: No space left on device "
                             "[os_error_code='28']\nmore lines")
    try:
        raise RuntimeError("Save Finalize thread failed") from tensorstore
    except RuntimeError as e:
        assert describe_failure(e) == "no space left on device (ENOSPC)"
    assert describe_failure(ValueError("x\ny")) == "ValueError: x"


DISK_FULL = textwrap.dedent(
    """
    import resource, signal, sys, time
    import grain, jax, jax.numpy as jnp
    from kronjax.checkpoint import Checkpointer, CheckpointSaveError

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    ckpt = Checkpointer(sys.argv[1], save_every=1)
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    ckpt.save(1, {"w": jnp.ones((4,))}, it, {"step": 1})
    ckpt.wait()
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
    ckpt.save(2, {"w": jax.random.normal(jax.random.key(0), (512, 512))}, it, {"step": 2})
    deadline = time.time() + 60
    while True:  # what the train loop does after every step; no further save
        try:
            ckpt.check()
        except CheckpointSaveError as e:
            print("REPORTED:", e)
            break
        assert time.time() < deadline, "the failed save was never reported"
        time.sleep(0.01)
    ckpt.close()
    print("closed")
    """
)


def test_failed_background_save_is_reported_at_once_in_one_line(tmp_path: Path) -> None:
    """Disk full, simulated by a file-size limit: the background save of step 2 fails. It was
    reported only at the next save, as the same error printed four times over 453 lines; now
    `check()` (called after every step) raises it in one line and step 1 is untouched."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reported = [line for line in proc.stdout.splitlines() if line.startswith("REPORTED:")]
    assert reported == [f"REPORTED: checkpoint save of step 2 to {tmp_path / '2'} failed: file "
                        "too large (EFBIG); the earlier checkpoints are untouched (latest: step "
                        "1; a rerun resumes from it once the cause is fixed)"]
    assert proc.stdout.splitlines()[-1] == "closed"
    assert "Traceback" not in proc.stderr and "ERROR:absl" not in proc.stderr, proc.stderr
    with Checkpointer(tmp_path, save_every=1) as c:
        assert c.all_steps() == [1]
        state, meta = c.restore(None, {"w": jnp.zeros((4,))}, None)
    assert meta == {"step": 1} and float(state["w"][0]) == 1.0
