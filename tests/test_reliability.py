"""Issue 26: readers never harm a running trainer, a NaN is never saved as good, and every
failure is one line that names its file.

One live tiny run (checkpoint_every=1) is trained in a thread while the readers (sample, a
probe, export, compare --report-only) read it; the run it leaves behind serves the tests
that need a trained workdir. Everything else is in-process and needs no training.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

from kronjax import compare
from kronjax import config as config_lib
from kronjax import train as train_cli
from kronjax.checkpoint import Checkpointer, UnreadableCheckpointError
from kronjax.metrics import read_metrics

TINY = config_lib.REPO_CONFIGS / "tiny.py"


def _overrides(data: Path, **extra: Any) -> list[tuple[str, str]]:
    base = {"data.dir": str(data), "train.steps": "1000", "train.checkpoint_every": "1",
            "train.eval_every": "1000", "train.log_every": "1000", "train.progress": "False",
            "model.n_layer": "1", "optim.warmup_steps": "1"}
    base.update({k.replace("__", "."): str(v) for k, v in extra.items()})
    return list(base.items())


def _cli(overrides: list[tuple[str, str]]) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides]


@pytest.fixture(autouse=True)
def _kronjax_logger() -> Any:
    """The CLIs reconfigure the "kronjax" logger (own handler, no propagation): put back."""
    logger = logging.getLogger("kronjax")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def _losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def live(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run trained in a thread, saving every step, while every reader reads it; then the
    same run undisturbed (same steps) for reference."""
    from kronjax import export, sample
    from kronjax.loop import train
    from kronjax.probes import geometry

    root = tmp_path_factory.mktemp("live")
    overrides = _overrides(tiny_data)
    cfg = compare.run_config(config_lib.build_config(TINY, overrides), "kron", 0)
    workdir = root / "cmp" / compare.run_name("kron", 0)
    readers_done = threading.Event()
    steps = [0]
    outcome: dict[str, Any] = {}

    def stop() -> bool:
        steps[0] += 1
        readers_done.wait(0.02)  # a save is in flight most of the time the readers read
        return readers_done.is_set()

    def trainer() -> None:
        try:
            outcome["result"] = train(cfg, workdir, stop=stop)
        except BaseException as e:  # noqa: BLE001 - the test reports it
            outcome["error"] = e
            readers_done.set()

    thread = threading.Thread(target=trainer)
    patch = pytest.MonkeyPatch()
    patch.setattr(export.nanogpt, "write", lambda run, info, out, force: None)
    thread.start()
    read: list[str] = []
    failed: list[str] = []
    try:
        while not (workdir / "checkpoints" / "1").is_dir() and thread.is_alive():
            readers_done.wait(0.05)
        readers = [
            ("sample", lambda: sample.main(["--workdir", str(workdir), "--tokens", "2"])),
            ("probe", lambda: geometry.main(["--workdirs", str(workdir), "--k", "2"])),
            ("export", lambda: export.export("nanogpt", workdir, root / "ckpt.pt", force=True)),
            # (nanogpt's writer is stubbed below: torch's import is 8 s, and writes no run file)
            ("compare", lambda: compare.main(["--config", str(TINY), "--arms", "kron",
                                              "--seeds", "1", "--out", str(root / "cmp"),
                                              "--report-only", *_cli(overrides)])),
        ]
        for name, reader in readers + readers[:1]:  # sample again: one more open, more saves
            if not thread.is_alive():
                break
            try:
                rc = reader()
            except SystemExit as e:
                rc = e.code
            except Exception as e:  # noqa: BLE001 - a reader broken by the live run
                rc = f"{type(e).__name__}: {e}"
            if rc not in (0, None) and name != "compare":  # compare: "not finished", rc 1
                failed.append(f"{name}: {rc}")
            read.append(name)
    finally:
        readers_done.set()
        thread.join()
        patch.undo()
    ref = root / "ref"
    n = steps[0]
    calls = [0]

    def ref_stop() -> bool:
        calls[0] += 1
        return calls[0] >= n

    train(compare.run_config(config_lib.build_config(
        TINY, overrides + [("train.checkpoint_every", "1000")]), "kron", 0), ref, stop=ref_stop)
    return {"workdir": workdir, "ref": ref, "outcome": outcome, "read": read, "steps": n,
            "reader_errors": failed,
            "cfg_overrides": overrides, "data": tiny_data}


def test_readers_never_disturb_a_live_trainer(live: dict[str, Any]) -> None:
    """Item 1: sample, a probe, export and compare --report-only beside a trainer saving
    every step: the trainer goes on, its losses identical to an undisturbed run's."""
    assert "error" not in live["outcome"], live["outcome"].get("error")
    assert not live["reader_errors"]
    assert live["read"][:4] == ["sample", "probe", "export", "compare"]
    assert live["outcome"]["result"].step == live["steps"] > 1
    got, want = _losses(live["workdir"]), _losses(live["ref"])
    assert len(got) == live["steps"] and got == want
    ckpts = live["workdir"] / "checkpoints"
    # the newest by number: as strings, "9" sorts after "10" (a run reaching step 10 failed)
    assert max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == live["steps"]


def test_reader_opens_checkpoints_read_only(live: dict[str, Any], tmp_path: Path) -> None:
    """Item 1: a reader leaves a save in progress (orbax's tmp folder) alone and creates
    nothing in the directory."""
    import shutil

    from kronjax.run import load_run

    wd = tmp_path / "run"
    shutil.copytree(live["workdir"], wd, ignore=shutil.ignore_patterns(".lock"))
    pending = wd / "checkpoints" / f"{live['steps'] + 1}.orbax-checkpoint-tmp-123"
    pending.mkdir()
    (pending / "part").write_bytes(b"being written")
    before = sorted(p.relative_to(wd) for p in wd.rglob("*"))
    loaded = load_run(wd)
    assert loaded.step == live["steps"]
    assert sorted(p.relative_to(wd) for p in wd.rglob("*")) == before


def test_reader_reads_again_when_a_live_trainer_deletes_a_step(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Item 1: the step a reader was reading deleted by the trainer's max_to_keep is no
    damage: the steps are listed again, the newest restored, no warning."""
    import shutil

    with Checkpointer(tmp_path / "c", save_every=1, async_save=False) as ck:
        for s in (1, 2):
            ck.save(s, _tree(float(s)), None, {})
    with Checkpointer(tmp_path / "c", save_every=1, read_only=True) as ck:
        real = ck._restore_step

        def deleted_meanwhile(step: int, *a: Any) -> Any:
            if step == 2:
                shutil.rmtree(tmp_path / "c" / "2")  # as the trainer's max_to_keep does
                raise FileNotFoundError("Checkpoint at .../2 not found.")
            return real(step, *a)

        ck._restore_step = deleted_meanwhile  # type: ignore[method-assign]
        with caplog.at_level(logging.WARNING, logger="kronjax"):
            state, _ = ck.restore(None, _tree(0.0), None)
    assert float(state["w"][0, 0]) == 1.0
    assert "cannot be restored" not in caplog.text


# -- item 2: a NaN is never saved as good -----------------------------------------------------
def _tree(value: float) -> dict[str, Any]:
    return {"w": jnp.full((4, 3), value, jnp.float32), "step": jnp.array(0, jnp.int32)}


def test_nonfinite_state_is_never_saved(tmp_path: Path) -> None:
    from kronjax.checkpoint import NonFiniteStateError

    ck = Checkpointer(tmp_path / "c", save_every=1, async_save=False)
    try:
        ck.save(1, _tree(1.0), None, {})
        with pytest.raises(NonFiniteStateError) as info:
            ck.save(2, _tree(float("nan")), None, {})
        assert ck.all_steps() == [1]
    finally:
        ck.close()
    msg = str(info.value)
    assert "step 2" in msg and "last checkpoint (step 1) is kept" in msg and "['w']" in msg
    with pytest.raises(NonFiniteStateError, match="no checkpoint has been saved yet"):
        with Checkpointer(tmp_path / "d", save_every=1, async_save=False) as ck2:
            ck2.save(1, _tree(float("inf")), None, {})


def test_restore_that_finds_only_nonfinite_steps_says_so(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps written before the check (here: with it patched out) are not restored as good."""
    from kronjax.checkpoint import checksums

    real = checksums.nonfinite_leaves
    monkeypatch.setattr(checksums, "nonfinite_leaves", lambda tree: ([], 0))
    with Checkpointer(tmp_path / "c", save_every=1, async_save=False) as ck:
        ck.save(1, _tree(float("nan")), None, {})
        ck.save(2, _tree(float("nan")), None, {})
    monkeypatch.setattr(checksums, "nonfinite_leaves", real)
    with Checkpointer(tmp_path / "c", save_every=1, read_only=True) as ck:
        with pytest.raises(UnreadableCheckpointError) as info:
            ck.restore(None, _tree(0.0), None)
    msg = str(info.value)
    assert "NaN or inf" in msg and "every step holds NaN or inf" in msg
    assert "step 1" in msg and "step 2" in msg


def test_diverged_run_stops_naming_the_last_finite_step(tiny_data: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    """peak_lr 1e30: the state goes NaN after a finite loss; nothing non-finite is saved and
    the one-line stop names the last finite step, never "step None"."""
    with pytest.raises(SystemExit) as info:
        train_cli.main(["--config", str(TINY), "--workdir", str(tmp_path / "w"), "--quiet",
                        *_cli(_overrides(tiny_data, optim__peak_lr="1e30",
                                         optim__warmup_steps="1"))])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert "step None" not in err and "NaN or inf" in err
    saved = sorted(int(p.name) for p in (tmp_path / "w" / "checkpoints").iterdir()
                   if p.name.isdigit())
    with Checkpointer(tmp_path / "w" / "checkpoints", save_every=1, read_only=True) as ck:
        for s in saved:  # every saved step restores as finite
            meta = ck.read_meta(s)
            assert meta is not None
    if saved:
        assert f"(step {saved[-1]}) is kept" in err
    else:
        assert "no checkpoint has been saved yet" in err


# -- item 3: the first error wins -------------------------------------------------------------
def test_cleanup_failure_never_hides_the_first_error(live: dict[str, Any], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    """A full disk fails the checkpoint save, then the TensorBoard flush in the cleanup: the
    save's one line is what is printed, exit 2, no traceback."""
    from kronjax import metrics
    from kronjax.checkpoint import errors, manager

    def full(self: Any, step: int, *a: Any, **k: Any) -> bool:
        raise errors.CheckpointSaveError(f"checkpoint save of step {step} failed: no space "
                                         "left on device (ENOSPC)")

    def flush_fails(self: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "events.out.tfevents")

    monkeypatch.setattr(manager.Checkpointer, "save", full)
    monkeypatch.setattr(metrics.MetricsWriter, "close", flush_fails)
    with pytest.raises(SystemExit) as info:
        train_cli.main(["--config", str(TINY), "--workdir", str(tmp_path / "w"), "--quiet",
                        *_cli(live["cfg_overrides"])])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.strip().splitlines() == [
        "python -m kronjax.train: error: checkpoint save of step 1 failed: no space left on "
        "device (ENOSPC)"]


def test_close_all_raises_the_first_cleanup_failure_without_an_error() -> None:
    from kronjax.errors import close_all

    ran = []

    def bad(name: str) -> Any:
        def f() -> None:
            ran.append(name)
            raise OSError(name)
        return f

    with pytest.raises(OSError, match="a"):
        close_all(bad("a"), bad("b"), after_error=False)
    close_all(bad("c"), after_error=True)  # logged at debug only
    assert ran == ["a", "b", "c"]


# -- items 5, 6: damaged log-type files are skipped line by line ------------------------------
def test_damaged_config_history_never_blocks_a_resume(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    cfg = config_lib.build_config(TINY, [])
    history, cfg_json = tmp_path / "config_history.jsonl", tmp_path / "config.json"
    config_lib.record_config(cfg_json, history, cfg, 0)
    with open(history, "ab") as f:
        f.write(b'{"step": 5, "config": {tr')  # cut short: no newline, not JSON
    cfg.optim.peak_lr = 0.5
    with caplog.at_level(logging.WARNING, logger="kronjax"):
        config_lib.record_config(cfg_json, history, cfg, 5)
    assert f"{history}: damaged line 2 (not JSON)" in caplog.text
    lines = history.read_bytes().split(b"\n")
    assert json.loads(lines[-2])["changed"] == {"optim.peak_lr": [0.01, 0.5]}


def test_damaged_config_json_is_one_line_naming_the_file(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    from kronjax import sample

    (tmp_path / "config.json").write_text("{bad")
    with pytest.raises(SystemExit) as info:
        sample.main(["--workdir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1
    assert f"{tmp_path / 'config.json'} is damaged" in err[0]


def test_non_utf8_metrics_line_is_skipped_with_file_and_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \xff}\n'
                     b'{"step": 3, "loss": 1.0}\n')
    with caplog.at_level(logging.WARNING, logger="kronjax"):
        records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 3]
    assert f"{path}: damaged line 2 (not UTF-8)" in caplog.text


# -- item 7: nothing to train is said; the JSON stays JSON ------------------------------------
def test_steps_at_the_saved_step_warns_and_prints_valid_json(
        live: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    wd = tmp_path / "run"
    shutil.copytree(live["workdir"], wd, ignore=shutil.ignore_patterns(".lock"))
    assert train_cli.main(["--config", str(TINY), "--workdir", str(wd), "--quiet", *_cli(
        live["cfg_overrides"] + [("train.steps", str(live["steps"]))])]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1],
                     parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert out["last_loss"] is None and out["step"] == live["steps"]
    assert f"nothing to train: the checkpoint in {wd} is at step {live['steps']}" in captured.err


def test_result_json_has_null_for_nan() -> None:
    from kronjax.console import result_json

    assert json.loads(result_json({"a": float("nan"), "b": [float("inf"), 1.0]})) == {
        "a": None, "b": [None, 1.0]}


# -- item 4: a huge eval_batches is capped, and said --------------------------------------------
def test_eval_batches_beyond_the_val_split_are_capped(caplog: pytest.LogCaptureFixture) -> None:
    from kronjax.data import eval_batch_count

    with caplog.at_level(logging.WARNING, logger="kronjax"):
        assert eval_batch_count(100000, 2781, 32, 8, "DATA") == 10
    assert "data.eval_batches=100000" in caplog.text and "data.eval_batches <= 10" in caplog.text
    caplog.clear()
    assert eval_batch_count(2, 2781, 32, 8, "DATA") == 2 and not caplog.text


# -- item 8: a full disk during prepare names the file --------------------------------------------
def test_full_disk_during_prepare_is_one_line_naming_the_shard(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from kronjax.data import writer
    from kronjax.data.store import DataError

    class Full:
        def __init__(self, *a: Any, **k: Any) -> None:
            self.fh = builtins.open(*a, **k)

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str) -> Any:
            return getattr(self.fh, name)

    monkeypatch.setattr(writer, "open", Full, raising=False)
    w = writer.ShardWriter(tmp_path, "train", np.dtype(np.uint16), 100, [], 0)
    with pytest.raises(DataError) as info:
        w.add(0, np.arange(10), 10)
    w.discard()
    msg = str(info.value)
    assert "no space left on device (ENOSPC)" in msg and ".train_00000.bin.partial" in msg
    assert str(tmp_path) in msg


# -- items 9, 12: export follows the umask, a killed export's leftovers go ---------------------
def test_export_follows_the_umask_and_clears_a_killed_exports_leftovers(tmp_path: Path) -> None:
    from kronjax.export.state import write_dir, write_file

    old = os.umask(0o022)
    try:
        stale = tmp_path / ".O.tmp-killed"
        stale.mkdir()
        (stale / "model.safetensors").write_bytes(b"half")
        (tmp_path / ".ck.pt.x1y2.tmp").write_bytes(b"half")

        def fill_dir(d: Path) -> None:
            (d / "model.safetensors").write_bytes(b"w")
            os.chmod(d / "model.safetensors", 0o600)  # as a library writing privately does

        write_dir(tmp_path / "O", False, fill_dir)
        write_file(tmp_path / "ck.pt", False, lambda p: p.write_bytes(b"w"))
    finally:
        os.umask(old)
    assert oct((tmp_path / "O").stat().st_mode & 0o777) == oct(0o755)
    assert oct((tmp_path / "O" / "model.safetensors").stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "ck.pt").stat().st_mode & 0o777) == oct(0o644)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["O", "ck.pt"]


# -- item 10: two damaged checkpoints in a row: a warning each, nothing more -------------------
def test_two_damaged_checkpoints_fall_back_quietly(tmp_path: Path,
                                                   capfd: pytest.CaptureFixture) -> None:
    with Checkpointer(tmp_path / "c", save_every=1, async_save=False) as ck:
        for s in (1, 2, 3):
            ck.save(s, _tree(float(s)), None, {})
    for s in (2, 3):
        for f in (tmp_path / "c" / str(s) / "state").rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(b"x" * 10)
    capfd.readouterr()
    with Checkpointer(tmp_path / "c", save_every=1) as ck:
        state, _ = ck.restore(None, _tree(0.0), None)
    assert float(state["w"][0, 0]) == 1.0
    out, err = capfd.readouterr()
    assert len((out + err).strip().splitlines()) <= 4, out + err


# -- item 11: a prompt longer than the context ---------------------------------------------------
def test_sample_prompt_longer_than_block_size_is_one_line(
        live: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    from kronjax import sample

    with pytest.raises(SystemExit) as info:
        sample.main(["--workdir", str(live["workdir"]), "--prompt", "word " * 200])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1
    assert "block_size 32" in err[0] and "shorten the prompt" in err[0]


def test_sample_tokens_cut_to_the_context_is_said(live: dict[str, Any],
                                                  capsys: pytest.CaptureFixture) -> None:
    from kronjax import sample

    assert sample.main(["--workdir", str(live["workdir"]), "--prompt", "the",
                        "--tokens", "100"]) == 0
    err = capsys.readouterr().err
    assert "--tokens 100 cut to" in err and "context is 32 tokens" in err


# -- item 13: an empty vocabulary -------------------------------------------------------------
def test_empty_vocabulary_is_refused() -> None:
    from kronjax.vocab import ByteVocab

    with pytest.raises(ValueError, match="at least one token"):
        ByteVocab.from_bytes([], 4)


# -- item 14: expected failures are one line, exit 2 ------------------------------------------
def _train_fails(args: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as info:
        train_cli.main(["--config", str(TINY), "--quiet", *args])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err, err
    return err


def test_workdir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "f").write_text("")
    err = _train_fails(["--workdir", str(tmp_path / "f")], capsys)
    assert f"--workdir {tmp_path / 'f'} is a file" in err


def test_lock_that_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "w" / ".lock").mkdir(parents=True)
    err = _train_fails(["--workdir", str(tmp_path / "w")], capsys)
    assert f"{tmp_path / 'w' / '.lock'} is a directory" in err


def test_full_disk_before_the_first_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    from kronjax import lock

    def full(*a: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lock.os, "pwrite", full)
    err = _train_fails(["--workdir", str(tmp_path / "w")], capsys)
    assert "no space left on device (ENOSPC)" in err and str(tmp_path / "w" / ".lock") in err


def test_unknown_data_source(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = _train_fails(["--workdir", str(tmp_path / "w"), "--config.data.source=nosuch",
                        f"--config.data.dir={tmp_path / 'd'}"], capsys)
    assert "unknown corpus source 'nosuch' (data.source" in err


def test_block_size_larger_than_a_split_names_the_split(tiny_data: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    err = _train_fails(["--workdir", str(tmp_path / "w"), f"--config.data.dir={tiny_data}",
                        "--config.model.block_size=4096"], capsys)
    assert f"the val split of {tiny_data} has" in err and "model.block_size" in err


def test_resume_with_another_arm_has_no_traceback(live: dict[str, Any], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    import shutil

    wd = tmp_path / "run"
    shutil.copytree(live["workdir"], wd, ignore=shutil.ignore_patterns(".lock"))
    err = _train_fails(["--workdir", str(wd), *_cli(live["cfg_overrides"]),
                        "--config.model.arm=bpe_tied"], capsys)
    assert "arm: checkpoint has 'kron', current config has 'bpe_tied'" in err


def test_sample_on_a_folder_that_is_not_a_run(tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    from kronjax import sample

    with pytest.raises(SystemExit) as info:
        sample.main(["--workdir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1
    assert "holds no config.json: not a kronjax.train workdir" in err[0]


def test_debug_level_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit):
        train_cli.main(["--config", str(TINY), "--log-level", "debug",
                        "--workdir", str(tmp_path / "f")])
    assert "Traceback" in capsys.readouterr().err
