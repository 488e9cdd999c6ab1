"""Runs that live in Cloud Storage, against a real-protocol emulator on 127.0.0.1.

The emulator (kronjax.emulator: gcp-storage-emulator in memory, plus the generation
preconditions and headers the real service has) starts once per session at a free port; only
STORAGE_EMULATOR_HOST points kronjax at it. Every Python process these tests start loads
tests/netguard/sitecustomize.py, which refuses and records any non-loopback connection or name
lookup (and this process is guarded the same way while the emulator runs); the strace test
checks the native clients too (tensorstore). Expectations are independent: a local run's
per-step losses, the bucket's own objects, transformers' logits of the exported model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

from kronjax.emulator import Emulator  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.py"
NETGUARD = Path(__file__).resolve().parent / "netguard"
STEPS, SAVE_EVERY = 40, 10  # saves at 10 and 20 before the kill at 25; the rerun 30 and 40
KEPT = [str(STEPS - SAVE_EVERY), str(STEPS)]  # what keep_checkpoints=2 leaves at the end
RUN = {"train.steps": STEPS, "train.checkpoint_every": SAVE_EVERY, "train.eval_every": 30,
       "train.log_every": 1, "train.keep_checkpoints": 2}


class Bucket:
    """The session's emulator, the environment subprocesses run in, and the URL maker."""

    def __init__(self, emulator: Emulator, guard_log: Path) -> None:
        self.emulator, self.guard_log = emulator, guard_log
        self.env = dict(os.environ, STORAGE_EMULATOR_HOST=emulator.host, JAX_PLATFORMS="cpu",
                        KRONJAX_NETGUARD_LOG=str(guard_log), PYTHON=sys.executable,
                        PYTHONPATH=os.pathsep.join([str(NETGUARD), str(REPO)]))
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env['PATH']}"

    def url(self, *parts: str) -> str:
        return "gs://" + "/".join([self.emulator.bucket, *parts])


@pytest.fixture(scope="session")
def bucket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bucket]:
    guard_log = tmp_path_factory.mktemp("netguard") / "refused.log"
    emulator = Emulator()
    os.environ["STORAGE_EMULATOR_HOST"] = emulator.host  # this process too, as a user would
    os.environ["KRONJAX_NETGUARD_LOG"] = str(guard_log)
    import socket

    saved = (socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo)
    spec = importlib.util.spec_from_file_location("kronjax_netguard", NETGUARD / "sitecustomize.py")
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # guards this process
    try:
        yield Bucket(emulator, guard_log)
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = saved
        emulator.stop()
    refused = guard_log.read_text() if guard_log.exists() else ""
    assert not refused, f"something tried to leave the machine:\n{refused}"


def _train_args(workdir: str, data: str, **extra: Any) -> list[str]:
    return [sys.executable, "-m", "kronjax.train", "--config", str(TINY), "--workdir", workdir,
            f"--config.data.dir={data}",
            *[f"--config.{k}={v}" for k, v in {**RUN, **extra}.items()]]


def _losses(metrics: str | Path) -> dict[int, float]:
    from kronjax.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(metrics) if "loss" in r}


@pytest.fixture(scope="session")
def local_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same run on local disk, uninterrupted (in process)."""
    from kronjax import config as config_lib
    from kronjax import loop

    wd = tmp_path_factory.mktemp("local") / "run"
    cfg = config_lib.build_config(TINY, [("data.dir", str(tiny_data)),
                                         *[(k, str(v)) for k, v in RUN.items()]])
    loop.train(cfg, wd, stop=lambda: False)
    return wd


@pytest.fixture(scope="session")
def killed_and_resumed(bucket: Bucket, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory
                       ) -> dict[str, Any]:
    """A tiny run into gs://, SIGKILLed once step 25 is logged, then rerun (under strace where
    it is available, so the native clients' connections are seen too)."""
    url, cwd = bucket.url("runs", "killed"), tmp_path_factory.mktemp("cwd")
    proc = subprocess.Popen(_train_args(url, str(tiny_data)), cwd=cwd, env=bucket.env,
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if f"step 25/{STEPS}" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    killed_at = max(_losses(url + "/metrics.jsonl"), default=0)  # the bucket's, at the kill
    trace = tmp_path_factory.mktemp("strace") / "connect.log"
    prefix = (["strace", "--seccomp-bpf", "-f", "-qq", "-e", "trace=connect", "-o", str(trace)]
              if _can_strace() else [])
    rerun = subprocess.run(prefix + _train_args(url, str(tiny_data)), cwd=cwd, env=bucket.env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    return {"url": url, "cwd": cwd, "rerun": rerun, "killed_at": killed_at,
            "trace": trace if prefix else None}


def _can_strace() -> bool:
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run(["strace", "--seccomp-bpf", "-f", "-qq", "-e", "trace=connect",
                            "true"], capture_output=True)
    return probe.returncode == 0


def test_killed_run_resumes_from_the_bucket_with_the_local_losses(
        killed_and_resumed: dict[str, Any], local_run: Path) -> None:
    from kronjax import storage

    url, rerun = killed_and_resumed["url"], killed_and_resumed["rerun"]
    # The kill came before the end, after the bucket held metrics up to a sync at least (the
    # eval-less saves at 10 and 20); the rerun resumed from a checkpoint no newer than that.
    assert 10 <= killed_and_resumed["killed_at"] < STEPS
    resumed = re.search(r"resumed from step (\d+)", rerun.stderr)
    assert resumed, rerun.stderr[-2000:]
    assert int(resumed[1]) % 10 == 0 and 10 <= int(resumed[1]) <= killed_and_resumed["killed_at"]
    assert json.loads(rerun.stdout.strip().splitlines()[-1])["step"] == STEPS
    got, want = _losses(url + "/metrics.jsonl"), _losses(local_run / "metrics.jsonl")
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    assert got == want  # identical per step, not merely close
    text = storage.as_path(url + "/metrics.jsonl").read_text()
    steps = [json.loads(line)["step"] for line in text.splitlines()]
    assert steps == sorted(set(steps)), "the bucket's metrics.jsonl repeats steps"
    wd = storage.as_path(url)
    assert sorted(p.name for p in wd.iterdir()) == ["checkpoints", "config.json",
                                                     "config_history.jsonl", "metrics.jsonl",
                                                     "tb"]  # the lock was released
    assert any(p.name.startswith("events.out.tfevents") for p in (wd / "tb").iterdir())
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == KEPT
    # No folder named gs: anywhere a relative path could have made one.
    for root in (killed_and_resumed["cwd"], REPO, Path.cwd()):
        assert not (root / "gs:").exists()


def test_nothing_leaves_the_machine_natively(killed_and_resumed: dict[str, Any]) -> None:
    """strace of the resumed run (tensorstore, gcsfs, google-auth, jax): every connect() is
    to loopback or a local socket."""
    trace = killed_and_resumed["trace"]
    if trace is None:
        pytest.skip("strace is not available here")
    calls = [line for line in trace.read_text().splitlines() if "connect(" in line]
    assert any("127.0.0.1" in c for c in calls), "the trace saw no emulator connection"
    outside = [c for c in calls if ("AF_INET" in c) and not re.search(
        r'inet_addr\("127\.|inet_pton\(AF_INET6, "(::1|::ffff:127\.)', c)]
    assert not outside, "\n".join(outside[:5])


def test_a_flipped_byte_in_the_newest_checkpoint_falls_back(
        killed_and_resumed: dict[str, Any], bucket: Bucket) -> None:
    from kronjax import storage
    from kronjax.run import load_run

    url = killed_and_resumed["url"]
    copy = bucket.url("runs", "flipped")
    fs = storage.filesystem(storage.as_path(url))
    src, dst = url.removeprefix("gs://"), copy.removeprefix("gs://")
    # The run's files and its two newest checkpoints: all a restore that falls back needs.
    for obj in fs.ls(src, detail=True):
        if obj["type"] == "file":
            fs.copy(obj["name"], dst + obj["name"].removeprefix(src))
    for step in KEPT:
        fs.copy(f"{src}/checkpoints/{step}", f"{dst}/checkpoints/{step}", recursive=True)
    data = [p for p in fs.find(copy.removeprefix("gs://") + f"/checkpoints/{STEPS}/state")
            if "/d/" in p]
    assert data, "no array data objects found"
    blob = bytearray(fs.cat_file(data[0]))
    blob[len(blob) // 2] ^= 0x01
    fs.pipe_file(data[0], bytes(blob))
    assert load_run(copy).step == STEPS - SAVE_EVERY
    assert load_run(url).step == STEPS


def test_a_second_trainer_on_the_bucket_workdir_is_refused(bucket: Bucket, tiny_data: Path
                                                           ) -> None:
    from kronjax import config as config_lib
    from kronjax import loop
    from kronjax.lock import BucketLock, WorkdirBusyError
    from kronjax.workdir import Workdir

    url = bucket.url("runs", "busy")
    cfg = config_lib.build_config(TINY, [("data.dir", str(tiny_data))])
    with BucketLock(Workdir.at(url).root):
        with pytest.raises(WorkdirBusyError, match=rf"pid {os.getpid()} on .*heartbeat 0 s ago"):
            loop.train(cfg, url, stop=lambda: True)
    result = loop.train(cfg, url, stop=lambda: True)  # released: the next trainer runs
    assert result.preempted and result.step == 1


def test_bucket_lock_stale_takeover_and_loss(bucket: Bucket, caplog: pytest.LogCaptureFixture
                                             ) -> None:
    """A lock whose heartbeat is older than the limit is taken over with a warning; its old
    holder, when it beats again, learns it lost the lock and stops."""
    import logging
    import time

    from kronjax import storage
    from kronjax.lock import BucketLock, WorkdirLostError

    root = storage.as_path(bucket.url("runs", "stale"))
    old = BucketLock(root, heartbeat_s=3600)  # frozen: its next heartbeat is an hour away
    old.acquire()
    time.sleep(0.3)
    with caplog.at_level(logging.WARNING, logger="kronjax.lock"):
        new = BucketLock(root, stale_s=0.1)
        new.acquire()
    assert "has not renewed it for 0 s (over 0 s)" in caplog.text
    assert "taking the workdir over" in caplog.text
    assert json.loads((root / ".lock").read_bytes())["token"] == new._token
    assert new.beat()  # the new holder renews its own generation
    assert not old.beat()  # the frozen trainer wakes: its generation is gone
    with pytest.raises(WorkdirLostError, match=f"another trainer \\(pid {os.getpid()} on"):
        old.check()
    old.release()  # must not delete the new holder's lock
    assert json.loads((root / ".lock").read_bytes())["token"] == new._token
    new.release()
    assert not (root / ".lock").exists()


def test_metrics_in_a_bucket_rewrite_whole_and_resume_without_repeats(bucket: Bucket) -> None:
    from kronjax.metrics import MetricsWriter, read_metrics

    url = bucket.url("runs", "metrics")
    w = MetricsWriter(url, is_main=True, total_steps=10, progress=False, sync_every_s=3600)
    for step in range(1, 7):
        w.write(step, {"loss": float(step)})
    assert read_metrics(url + "/metrics.jsonl") == []  # nothing synced yet
    w.sync()
    assert [r["step"] for r in read_metrics(url + "/metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    w.close()
    # A resume from step 4: steps 5 and 6 are trained again, so the bucket drops them.
    w = MetricsWriter(url, is_main=True, total_steps=10, progress=False, initial_step=4)
    w.write(5, {"loss": 50.0})
    w.close()
    recs = read_metrics(url + "/metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in recs] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0),
                                                      (5, 50.0)]


def test_data_published_to_a_bucket_are_copied_verified_and_refetched(
        bucket: Bucket, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kronjax import storage
    from kronjax.data import remote
    from kronjax.data.store import DataError, load_split

    url = bucket.url("data", "published")
    meta = remote.publish(tiny_data, url)
    assert set(meta["files"]) == {"train_00000.bin", "val_00000.bin", "tokenizer.model"}
    monkeypatch.setenv("KRONJAX_DATA", str(tmp_path / "cache"))
    local = remote.fetch(url)
    assert local == tmp_path / "cache" / "gs" / bucket.emulator.bucket / "data" / "published"
    np.testing.assert_array_equal(np.asarray(load_split(local, "train")),
                                  np.asarray(load_split(tiny_data, "train")))
    shard = local / "train_00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[7] ^= 0xFF
    shard.write_bytes(bytes(raw))  # a damaged copy (same size): fetched again
    remote.fetch(url)
    assert shard.read_bytes() == (tiny_data / "train_00000.bin").read_bytes()
    bad = storage.as_path(url) / "val_00000.bin"
    bad.write_bytes(bad.read_bytes()[:-2])  # the bucket's copy is damaged: another host
    monkeypatch.setenv("KRONJAX_DATA", str(tmp_path / "other_host"))  # refuses it
    with pytest.raises(DataError, match="val_00000.bin does not match .* after two copies"):
        remote.fetch(url)


def test_two_processes_train_from_bucket_data_into_one_bucket_workdir(
        bucket: Bucket, local_run: Path, tmp_path: Path) -> None:
    """`python -m kronjax.data prepare --out gs://...`, then launch/local.sh runs 2 processes
    on one gs:// workdir with data.dir in the bucket: each process copies the data to its own
    cache; the losses are the 1-process local run's (same data: prepared from the same
    source and tokenizer)."""
    data = bucket.url("data", "pydoc512")
    prep = subprocess.run([sys.executable, "-m", "kronjax.data", "prepare", "--source", "pydoc",
                           "--vocab-size", "512", "--out", data, "--no-progress"], cwd=tmp_path,
                          env=bucket.env, capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr[-3000:]
    url = bucket.url("runs", "two_procs")
    env = dict(bucket.env, KRONJAX_DATA=str(tmp_path / "hosts_cache"))
    proc = subprocess.run(["bash", str(REPO / "launch" / "local.sh"), "2", "-d", "1", "--",
                           *_train_args(url, data, **{"train.steps": 10})],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got, want = _losses(url + "/metrics.jsonl"), _losses(local_run / "metrics.jsonl")
    assert sorted(got) == list(range(1, 11))
    # The same batches on a 2-device mesh: equal up to the order of the gradient reduction.
    np.testing.assert_allclose([got[s] for s in range(1, 4)], [want[s] for s in range(1, 4)],
                               rtol=1e-5)
    from kronjax import storage

    state = storage.as_path(url + "/checkpoints/10/data")
    assert sorted(p.name for p in state.iterdir() if p.name.endswith(".json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]


def test_export_sample_probes_and_compare_take_bucket_paths(
        killed_and_resumed: dict[str, Any], bucket: Bucket, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import jax.numpy as jnp

    from kronjax import storage
    from kronjax.export import cli as export_cli
    from kronjax.probes import robustness
    from kronjax.run import load_run

    url = killed_and_resumed["url"]
    out = bucket.url("exports", "killed_hf")
    assert export_cli.main(["hf", "--workdir", url, "--out", out]) == 0
    local = tmp_path / "hf"
    local.mkdir()
    for obj in storage.as_path(out).iterdir():
        storage.download(obj, local / obj.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(local)
    run = load_run(url)
    ids = np.random.default_rng(0).integers(0, run.tokenizer.vocab_size, (2, 16))
    with torch.no_grad():
        got = model(torch.from_numpy(ids)).logits.numpy()
    want = np.asarray(run.model.apply({"params": run.params}, jnp.asarray(ids)))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    probe_out = bucket.url("probes", "robustness")
    result = robustness.run([url], out=probe_out)
    assert result["checkpoints"][0]["label"] == "killed"
    written = json.loads(storage.as_path(probe_out + "/robustness.json").read_text())
    assert written["pairs_used"] == result["pairs_used"] > 0


def test_compare_trains_and_reports_into_a_bucket(bucket: Bucket, tiny_data: Path) -> None:
    from kronjax import compare, storage

    out = bucket.url("compare")
    rc = compare.main(["--config", str(TINY), "--arms", "kron", "--seeds", "1", "--out", out,
                       f"--config.data.dir={tiny_data}", "--config.train.steps=4",
                       "--config.train.eval_every=4", "--config.optim.warmup_steps=1"])
    assert rc == 0
    summary = json.loads(storage.as_path(out + "/summary.json").read_text())
    records = [json.loads(x) for x in
               storage.as_path(out + "/kron_s0/metrics.jsonl").read_text().splitlines()]
    last_val = [r["val_loss"] for r in records if "val_loss" in r][-1]
    assert summary["per_seed"]["kron"]["val_loss"]["0"] == pytest.approx(last_val, rel=1e-6)
    assert 4.0 < last_val < 7.0  # a 512-piece vocabulary after 4 steps: near ln(512) = 6.24
    assert (storage.as_path(out) / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_unusable_urls_are_one_line_errors_before_anything_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
        ) -> None:
    from kronjax import storage, train

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(TINY), "--workdir", "s3://bucket/run"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not s3://" in err and "gs://" in err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gcsfs" else real(name, *a))
    with pytest.raises(SystemExit):
        train.main(["--config", str(TINY), "--workdir", "gs://bucket/run"])
    assert "pip install 'kronjax[gcs]'" in capsys.readouterr().err
    with pytest.raises(storage.StorageError, match="no bucket name"):
        storage.as_path("gs:///run")
    assert list(tmp_path.iterdir()) == []  # nothing written, no folder named s3: or gs:
