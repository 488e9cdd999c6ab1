"""`python -m kronjax.train` as a person sees it: the lines it prints, off a terminal and in one."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import shutil
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
