"""`python -m kronjax.train` as a person sees it: the lines it prints, off a terminal and in one."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kronjax import console

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.py"


def train_args(workdir: Path, data: Path, *extra: str, **overrides: object) -> list[str]:
    """The CLI on configs/tiny.py with a few steps: seconds on a busy CPU."""
    cfg = {"data.dir": data, "train.steps": 4, "train.checkpoint_every": 4,
           "train.eval_every": 4, "train.log_every": 2, "train.batch_size": 4,
           "optim.warmup_steps": 2, **overrides}
    return [sys.executable, "-m", "kronjax.train", "--config", str(TINY), "--workdir",
            str(workdir), *extra, *[f"--config.{k}={v}" for k, v in cfg.items()]]


@pytest.fixture
def kronjax_logger() -> Iterator[logging.Logger]:
    """The "kronjax" logger, put back as it was after a test reconfigured it."""
    logger = logging.getLogger("kronjax")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture(scope="module")
def file_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 4-step run with stdout and stderr both going to a file (a pod or SLURM job)."""
    wd = tmp_path_factory.mktemp("cli")
    log = wd.parent / f"{wd.name}.log"
    with open(log, "w") as f:
        proc = subprocess.run(train_args(wd, tiny_data), stdout=f, stderr=subprocess.STDOUT,
                              timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text
    return wd, text


def test_output_to_a_file_shows_steps_eval_params_and_saves(file_run: tuple[Path, str]) -> None:
    """Importing orbax ran absl's logging.basicConfig first: only the final JSON came out."""
    _, text = file_run
    assert "params: " in text and "total (input side" in text
    assert "mesh data=1" in text and "data: pydoc" in text and "new run in" in text
    assert "step 2/4 | loss " in text and "| lr " in text and "tok/s" in text and "eta" in text
    assert "step 4/4 | loss " in text
    assert "eval step 4/4 | val loss " in text and "val bpb " in text
    assert "checkpoint: saving step 4" in text
    assert text.count("step 2/4 | loss ") == 1  # printed once, not also by absl's root handler
    assert json.loads(text.strip().splitlines()[-1])["step"] == 4


def _pty_without_size() -> tuple[int, int]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
    return master, slave


def test_resume_in_a_sizeless_pty_prints_lines(file_run: tuple[Path, str], tiny_data: Path,
                                               tmp_path: Path) -> None:
    """A pseudo-terminal reporting 0 columns got a blank progress bar and no lines."""
    wd = tmp_path / "run"
    shutil.copytree(file_run[0], wd)
    master, slave = _pty_without_size()
    proc = subprocess.Popen(train_args(wd, tiny_data, **{"train.steps": 6,
                                                         "train.progress": True}),
                            stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    chunks = []
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            data = os.read(master, 4096)
        except OSError:  # the child closed the pty
            break
        if not data:
            break
        chunks.append(data)
    out, _ = proc.communicate(timeout=60)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, text
    assert "resumed from step 4" in text and "step 6/6 | loss " in text
    assert json.loads(out.strip().splitlines()[-1])["step"] == 6


def test_is_terminal_needs_a_width() -> None:
    master, slave = _pty_without_size()
    with os.fdopen(slave, "w") as f:
        assert not console.is_terminal(f)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        assert console.is_terminal(f)
    os.close(master)
    assert not console.is_terminal(open(os.devnull, "w"))


def test_setup_logging_wins_over_an_earlier_basic_config(
        kronjax_logger: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # what absl's basicConfig leaves behind
    root.addHandler(handler)
    try:
        console.setup_logging("info")
        logging.getLogger("kronjax.loop").info("visible %d", 1)
        logging.getLogger("kronjax.loop").debug("hidden")
        console.setup_logging("warning")  # --quiet; replaces, does not add, its handler
        logging.getLogger("kronjax.loop").info("hidden too")
        logging.getLogger("kronjax.loop").warning("a warning")
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    assert err.count("kronjax.loop: visible 1") == 1 and "hidden" not in err
    assert err.count("a warning") == 1
    with pytest.raises(ValueError, match="debug, info, warning, error"):
        console.setup_logging("loud")


def test_step_line_and_eta() -> None:
    line = console.step_line(10, 40, {"loss": 5.12341, "lr": 0.01, "grad_norm": 0.5612,
                                      "tokens_per_s": 2900.4}, 12.4)
    assert line == ("step 10/40 | loss 5.1234 | lr 1.00e-02 | grad 0.561 | 2,900 tok/s | "
                    "mfu - | eta 0:00:12")
    assert "mfu 41.0%" in console.step_line(1, 2, {"loss": 1.0, "mfu": 0.41}, None)
    now = [100.0]
    clock = console.StepClock(lambda: now[0])
    clock.tick(5)
    assert clock.eta_s(5, 40) is None
    now[0] = 110.0
    assert clock.eta_s(15, 40) == pytest.approx(25.0)  # 1 s per step, 25 to go


HOLD_LOCK = ("import sys, time\nfrom kronjax.lock import WorkdirLock\n"
             "WorkdirLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(300)\n")


def test_second_trainer_is_refused_and_a_killed_holders_lock_is_taken_over(
        tiny_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two trainers on one workdir wrote every step twice, crashed in orbax, or hung 300 s."""
    from kronjax.lock import WorkdirBusyError, WorkdirLock

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        proc = subprocess.run(train_args(tmp_path, tiny_data), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert f"pid {holder.pid} on " in last and "in use by another trainer" in last
        assert "Traceback" not in proc.stderr and not (tmp_path / "metrics.jsonl").exists()
        with pytest.raises(WorkdirBusyError, match=f"pid {holder.pid}"):
            WorkdirLock(tmp_path).acquire()
    finally:
        holder.kill()  # kill -9: no clean release, the file still names it
        holder.wait()
    assert f'"pid": {holder.pid}' in (tmp_path / ".lock").read_text()
    with caplog.at_level(logging.WARNING, logger="kronjax.lock"), WorkdirLock(tmp_path):
        assert str(os.getpid()) in (tmp_path / ".lock").read_text()
        with pytest.raises(WorkdirBusyError, match=f"pid {os.getpid()}"):
            WorkdirLock(tmp_path).acquire()  # a second open file: flock refuses it too
    assert f"pid {holder.pid}" in caplog.text and "taking the workdir over" in caplog.text
    assert (tmp_path / ".lock").read_text() == ""  # released cleanly: no holder named
    WorkdirLock(tmp_path).acquire()


def _one_line_error(proc: subprocess.CompletedProcess[str], *expected: str) -> str:
    """A user error: a non-zero exit, its message last on stderr, and no traceback."""
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert all(e in last for e in expected), proc.stderr
    return last


@pytest.mark.parametrize("case", ["batch_size=0", "steps without a value", "empty source",
                                  "batch over 4 devices"])
def test_user_errors_are_one_line_before_work_starts(case: str, tiny_data: Path,
                                                     tmp_path: Path) -> None:
    """batch_size=0 was a ZeroDivisionError, a batch of 6 on 4 data-parallel devices silently
    ran replicated, an empty source and a bare --config.train.steps were tracebacks."""
    env = dict(os.environ)
    wd = tmp_path / "run"
    if case == "batch_size=0":
        args, expected = train_args(wd, tiny_data, **{"train.batch_size": 0}), (
            "train.batch_size must be an integer >= 1", "got 0")
    elif case == "steps without a value":
        args = [*train_args(wd, tiny_data), "--config.train.steps"]
        expected = ("--config.train.steps needs a value",)
    elif case == "empty source":
        (tmp_path / "empty.txt").write_text("")
        args = train_args(wd, tmp_path / "data", **{"data.source": tmp_path / "empty.txt"})
        expected = ("empty.txt", "holds no text")
    else:
        env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
        env["JAX_PLATFORMS"] = "cpu"
        args = train_args(wd, tiny_data, **{"train.batch_size": 6, "mesh.data": 4})
        expected = ("train.batch_size 6", "4 data-parallel devices (data=4)",
                    "use train.batch_size 4 or 8")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    _one_line_error(proc, *expected)
    assert not (wd / "metrics.jsonl").exists() and not (tmp_path / "data").exists()


def test_run_settings_are_checked() -> None:
    from kronjax import config as config_lib

    for key in ("train.eval_every", "train.log_every", "train.checkpoint_every"):
        cfg = config_lib.build_config(TINY, [(key, "0")])
        with pytest.raises(config_lib.ConfigError, match=f"{key} must be an integer >= 1"):
            config_lib.check_run_config(cfg)
    cfg = config_lib.build_config(TINY, [("train.grad_accum", "3")])
    with pytest.raises(config_lib.ConfigError, match="not divisible by train.grad_accum 3"):
        config_lib.check_run_config(cfg)
    for path in sorted(TINY.parent.glob("*.py")):  # every shipped config passes
        config_lib.check_run_config(config_lib.build_config(path, []))


@pytest.mark.parametrize("argv,expected", [
    (["--tokens", "-3"], "--tokens must be >= 0; got -3"),
    ([b"--prompt", b"ab\xffcd"], "--prompt holds bytes that are not UTF-8 (byte 2: b'\\xff')"),
])
def test_sample_refuses_bad_arguments(argv: list[str | bytes], expected: str,
                                      tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "kronjax.sample", "--workdir", str(tmp_path),
                           *argv], capture_output=True, timeout=120)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2 and "Traceback" not in err and expected in err, err


def _wait_for(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path}:\n{path.read_text() if path.exists() else ''}")


def test_ctrl_c_saves_and_a_second_exits_at_once(tiny_data: Path, tmp_path: Path) -> None:
    """SIGINT was a KeyboardInterrupt traceback that lost the steps since the last save."""
    from kronjax.checkpoint import Checkpointer

    wd, log = tmp_path / "run", tmp_path / "log"
    args = train_args(wd, tiny_data, **{"train.steps": 200, "train.checkpoint_every": 100})
    with open(log, "w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err)
        _wait_for(log, "new run in", proc)  # setting up: the save comes after the first step
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, log.read_text()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["preempted"] and 1 <= result["step"] < 100
    saved = Checkpointer(wd / "checkpoints", save_every=100).all_steps()
    assert saved == [result["step"]]
    assert "received SIGINT" in log.read_text() and "Traceback" not in log.read_text()

    wd2 = tmp_path / "run2"  # Ctrl-C twice: out at once, whatever it was doing, nothing saved
    with open(log, "w") as err:
        proc = subprocess.Popen(train_args(wd2, tiny_data), stdout=subprocess.PIPE, stderr=err)
        _wait_for(log, "data: pydoc", proc)  # the handler is in place before the data load
        proc.send_signal(signal.SIGINT)
        _wait_for(log, "received SIGINT", proc)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGINT, log.read_text()
    assert "second SIGINT: exiting now" in log.read_text()
    assert Checkpointer(wd2 / "checkpoints", save_every=4).all_steps() == []
