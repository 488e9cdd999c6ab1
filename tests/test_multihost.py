"""The real multi-host path on one machine: launch/local.sh runs 2 processes x 2 CPU devices
that meet through jax.distributed (gloo), each loading only its rows of the global batch.

Checks: the 2-process run's losses equal a 1-process 4-device run's; its checkpoint (written
collectively) resumes in a 1-process run on another mesh; the processes' rows of every batch
are disjoint and together are exactly the single-process batch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.py"
LOCAL = REPO / "launch" / "local.sh"
RUN = {"train.steps": 8, "train.checkpoint_every": 4, "train.eval_every": 8,
       "train.batch_size": 8, "train.grad_accum": 2, "optim.warmup_steps": 2}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="launch/local.sh needs bash")


def _env(devices: int | None = None) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    flags = env.get("XLA_FLAGS", "")  # the run's (tests/conftest.py), plus a device count
    if devices:
        flags += f" --xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = flags.strip()
    return env


def _train_args(workdir: Path, data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "kronjax.train", "--config", str(TINY), "--workdir",
            str(workdir), f"--config.data.dir={data_dir}",
            *[f"--config.{k}={v}" for k, v in RUN.items()]]


def _records(workdir: Path) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec
    return out


def _local(n: int, devices: int, args: list[str], timeout: int = 300
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(LOCAL), str(n), "-d", str(devices), "--", *args],
                          capture_output=True, text=True, cwd=REPO, env=_env(), timeout=timeout)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kronjax import config as config_lib
    from kronjax.data import cache as data_cache

    d = tmp_path_factory.mktemp("mh") / "pydoc"
    data_cache.ensure_data(config_lib.build_config(TINY, [("data.dir", str(d))]), progress=False)
    return d


@pytest.fixture(scope="module")
def runs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    two, one = root / "two_procs", root / "one_proc"
    proc = _local(2, 2, _train_args(two, data_dir))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[0] " in proc.stdout and '"step": 8' in proc.stdout  # process 0 reports
    assert '[1] {"workdir"' not in proc.stdout                    # only process 0 does
    single = subprocess.run(_train_args(one, data_dir), capture_output=True, text=True, cwd=REPO,
                            env=_env(4), timeout=300)
    assert single.returncode == 0, single.stderr[-4000:]
    return {"two": two, "one": one}


@pytest.mark.slow
def test_two_processes_match_one_process(runs: dict[str, Path]) -> None:
    two, one = _records(runs["two"]), _records(runs["one"])
    assert sorted(two) == sorted(one) == list(range(1, 9))
    for step in one:
        np.testing.assert_allclose(two[step]["loss"], one[step]["loss"], rtol=1e-5, err_msg=step)
    np.testing.assert_allclose(two[8]["val_loss"], one[8]["val_loss"], rtol=1e-5)
    # Process 0 alone wrote logs and config; both processes wrote their iterator position.
    assert (runs["two"] / "config.json").exists()
    data = sorted(p.name for p in (runs["two"] / "checkpoints" / "4" / "data").iterdir()
                  if p.suffix == ".json")
    assert data == ["process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process(runs: dict[str, Path], data_dir: Path,
                                                       tmp_path: Path) -> None:
    """Step 4 of the 2-process run (a 4-device mesh), resumed here on 1 device: steps 5..8
    equal the uninterrupted run's, so state and data position came back onto the new mesh."""
    from kronjax import config as config_lib
    from kronjax import loop

    wd = tmp_path / "resumed"
    shutil.copytree(runs["two"], wd)
    shutil.rmtree(wd / "checkpoints" / "8")
    cfg = config_lib.build_config(TINY, [("data.dir", str(data_dir)),
                                         *[(k, str(v)) for k, v in RUN.items()]])
    result = loop.train(cfg, wd, stop=lambda: False)
    assert result.step == 8
    got, want = _records(wd), _records(runs["two"])
    for step in range(5, 9):
        np.testing.assert_allclose(got[step]["loss"], want[step]["loss"], rtol=1e-5,
                                   err_msg=step)


def test_process_rows_are_disjoint_and_complete(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.bin"
    np.arange(5000, dtype=np.uint16).tofile(tokens)
    proc = _local(2, 2, [sys.executable, __file__, "worker", str(tokens), str(tmp_path)],
                  timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rows_{i}.json").read_text()) for i in range(2)]
    for case in reports[0]:
        a, b = reports[0][case], reports[1][case]
        assert a["equal_to_single_process"] and b["equal_to_single_process"], case
        if case.startswith("tensor"):  # the batch is replicated over both processes
            assert a["rows"] == b["rows"] == [[0, 1]]
            continue
        starts_a = {s for step in a["starts"] for s in step}
        starts_b = {s for step in b["starts"] for s in step}
        assert (a["rows"], b["rows"]) == ([[0, 2]], [[1, 2]]), case
        for sa, sb, full in zip(a["starts"], b["starts"], a["single"]):
            assert not set(sa) & set(sb) and sorted(sa + sb) == sorted(full), case
        assert starts_a and starts_b


def _worker(tokens_path: str, out_dir: str) -> None:
    """Under local.sh: each process builds its rows of a few batches and checks the global
    array they form against the single-process batch."""
    from jax.experimental import multihost_utils

    from kronjax import data as data_lib
    from kronjax import mesh as sharding
    from kronjax.cluster import initialize_distributed
    from kronjax.step import split_micro

    assert initialize_distributed("auto")
    import jax

    assert jax.process_count() == 2 and jax.device_count() == 4
    tokens = np.memmap(tokens_path, dtype=np.uint16, mode="r")
    seq, batch, accum = 8, 8, 2
    report: dict[str, Any] = {}
    for name, sizes in (("data", {"data": 4}), ("fsdp", {"data": 1, "fsdp": 4}),
                        ("data_tensor", {"data": 2, "tensor": 2}),
                        ("tensor", {"data": 1, "tensor": 4})):
        mesh = sharding.make_mesh(sizes)
        rules = sharding.make_rules()
        shape = (accum, batch // accum, seq)
        sh = sharding.batch_sharding(mesh, rules, shape, batch_dim=1)
        k, n = sharding.process_rows(sh, shape, batch_dim=1)
        mine = iter(data_lib.train_dataset(tokens, seq_len=seq, global_batch=batch, seed=5,
                                           process_index=k, process_count=n,
                                           micro_batches=accum))
        whole = iter(data_lib.train_dataset(tokens, seq_len=seq, global_batch=batch, seed=5))
        ok, starts, single = True, [], []
        for _ in range(3):
            local, full = next(mine), next(whole)
            g = sharding.global_batch(split_micro(local, accum), sh, shape)
            gathered = multihost_utils.process_allgather(g["inputs"], tiled=True)
            ok &= bool(np.array_equal(np.asarray(gathered), split_micro(full, accum)["inputs"]))
            starts.append((local["inputs"][:, 0] // seq).tolist())
            single.append((full["inputs"][:, 0] // seq).tolist())
        report[name] = {"rows": [[k, n]], "equal_to_single_process": ok, "starts": starts,
                        "single": single}
    Path(out_dir, f"rows_{jax.process_index()}.json").write_text(json.dumps(report))


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(sys.argv[2], sys.argv[3])


def _fake_bin(tmp_path: Path, name: str) -> Path:
    """A stand-in `name` on PATH that records its arguments, one per line."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    log = tmp_path / f"{name}.log"
    (bindir / name).write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {log}\necho ---- >> {log}\n')
    (bindir / name).chmod(0o755)
    return log


def test_tpu_pod_launcher_runs_on_every_worker(tmp_path: Path) -> None:
    log = _fake_bin(tmp_path, "gcloud")
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(REPO / "launch" / "tpu_pod.sh"), "my-v4-32", "us-central2-b",
                           "--project", "p1", "--", "python", "-m", "kronjax.train",
                           "--distributed", "--config.model.arm=kron"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = log.read_text().split("----")[0].split()
    assert args[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-v4-32"]
    assert "--worker=all" in args and "us-central2-b" in args and "p1" in args
    command = log.read_text().split("--command\n")[1].split("\n----")[0]
    assert command == ("cd kronjax && python -m kronjax.train --distributed "
                       "--config.model.arm=kron ")
    bad = subprocess.run(["bash", str(REPO / "launch" / "tpu_pod.sh"), "x"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "TPU_NAME ZONE" in bad.stderr


def test_tpu_pod_dry_run_is_the_same_line_compiled_here(tmp_path: Path) -> None:
    """--dry-run runs the pod command on this host with --dry_run --topology TYPE added."""
    log = _fake_bin(tmp_path, "gcloud")
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    pod = ["my-v4-32", "us-central2-b", "--type", "v4-32", "--", "echo", "python", "-m",
           "kronjax.train", "--distributed", "--config.model.arm=kron"]
    proc = subprocess.run(["bash", str(REPO / "launch" / "tpu_pod.sh"), "--dry-run", *pod],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["python", "-m", "kronjax.train", "--config.model.arm=kron",
                                   "--dry_run", "--topology", "v4-32"]
    assert not log.exists(), "a dry run must not reach the slice"
    untyped = subprocess.run(["bash", str(REPO / "launch" / "tpu_pod.sh"), "--dry-run", "x", "z",
                              "--", "echo"], capture_output=True, text=True, env=env, timeout=60)
    assert untyped.returncode == 2 and "--type" in untyped.stderr


def test_slurm_script_starts_one_distributed_process_per_task(tmp_path: Path) -> None:
    log = _fake_bin(tmp_path, "srun")
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
               SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="8")
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm_gpu.sbatch"), "--config",
                           "configs/tiny.py"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = log.read_text().split()
    assert args[:3] == ["--kill-on-bad-exit=1", "--cpu-bind=none", "python"]
    assert args[3:] == ["-m", "kronjax.train", "--distributed", "--config", "configs/tiny.py",
                        "----"]
