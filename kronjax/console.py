"""What a run shows a person: log lines on stderr beside a tqdm bar, and the per-step line.

Why a handler of its own: importing orbax (through absl) calls `logging.basicConfig()` before
any CLI runs, so a `basicConfig` in the CLI is a no-op and, with the root logger at WARNING,
every INFO line of a run is dropped: `python -m kronjax.train > log 2>&1` showed only the final
JSON. `setup_logging` gives the "kronjax" logger its own handler (it does not propagate, so no
line is printed twice). The handler writes through `tqdm.write`, which clears and redraws a
progress bar on the same stream, so the bar and the lines coexist in a terminal; off a
terminal there is no bar and the lines are plain. Only process 0 prints below WARNING.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from tqdm.auto import tqdm

__all__ = ["LEVELS", "StepClock", "eval_line", "is_terminal", "result_json", "setup_logging",
           "step_line"]

LOGGER = "kronjax"
LEVELS = ("debug", "info", "warning", "error")
FORMAT = "%(asctime)s %(name)s: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"


class _TqdmHandler(logging.Handler):
    """Writes each record with tqdm.write to the current sys.stderr (looked up per record, so
    a redirected or captured stderr is honoured)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise into the run
            self.handleError(record)


class _MainProcessOnly(logging.Filter):
    """Drops records below WARNING on processes other than 0 (once jax.distributed is up;
    before that the process index is unknown and asking JAX would start its backend)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        import jax

        return not jax.distributed.is_initialized() or jax.process_index() == 0


def setup_logging(level: int | str = logging.INFO) -> logging.Logger:
    """Route the "kronjax" logger to stderr at `level` (a name from LEVELS or a number),
    whatever a library did to the root logger first. Idempotent: replaces its own handler."""
    if isinstance(level, str):
        if level.lower() not in LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LEVELS)}; got {level!r}")
        level = getattr(logging, level.upper())
    logger = logging.getLogger(LOGGER)
    for h in [h for h in logger.handlers if isinstance(h, _TqdmHandler)]:
        logger.removeHandler(h)
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    handler.addFilter(_MainProcessOnly())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


def is_terminal(stream: IO[Any] | None = None) -> bool:
    """A terminal a progress bar can be drawn on: a tty that reports a width. A pseudo-terminal
    with no size (0 columns: some CI runners, `script`, docker -t) would get a blank bar."""
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False


class StepClock:
    """Wall time per step since the first step this process finished (compilation excluded),
    for an ETA that includes evaluation and checkpoint pauses as they really occur."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._start: tuple[float, int] | None = None

    def tick(self, step: int) -> None:
        if self._start is None:
            self._start = (self._clock(), step)

    def eta_s(self, step: int, total: int) -> float | None:
        """Seconds until `total` at the mean rate so far; None before a rate is known."""
        if self._start is None or step <= self._start[1]:
            return None
        t0, s0 = self._start
        return (self._clock() - t0) / (step - s0) * max(total - step, 0)


def _eta(seconds: float | None) -> str:
    return "-" if seconds is None else str(datetime.timedelta(seconds=round(seconds)))


def step_line(step: int, total: int, record: Mapping[str, float], eta_s: float | None) -> str:
    """`step 10/40 | loss 5.1234 | lr 1.00e-02 | grad 0.56 | 2,900 tok/s | mfu - | eta 0:00:12`."""
    tps = record.get("tokens_per_s")
    mfu = record.get("mfu")
    return " | ".join([
        f"step {step}/{total}",
        f"loss {record['loss']:.4f}",
        f"lr {record['lr']:.2e}" if "lr" in record else "lr -",
        f"grad {record['grad_norm']:.3g}" if "grad_norm" in record else "grad -",
        f"{tps:,.0f} tok/s" if tps is not None and tps != float("inf") else "- tok/s",
        f"mfu {100 * mfu:.1f}%" if mfu is not None else "mfu -",
        f"eta {_eta(eta_s)}",
    ])


def eval_line(step: int, total: int, val_loss: float, val_bpb: float) -> str:
    """`eval step 20/40 | val loss 5.3185 | val bpb 4.0514`."""
    return f"eval step {step}/{total} | val loss {val_loss:.4f} | val bpb {val_bpb:.4f}"


def result_json(result: Mapping[str, Any]) -> str:
    """The final stdout line: valid JSON always (a NaN or inf becomes null, as JSON has none)."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, Mapping):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(result), allow_nan=False)
