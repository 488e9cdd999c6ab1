"""Training telemetry: JSONL (the durable record), TensorBoard, a progress bar, tokens/s, MFU.

`metrics.jsonl` is flushed line by line and only ever appended to, so a crash
loses at most the line being written and a resumed run continues the same
file; readers keep the last record per step (`read_metrics`: steps after the
resumed checkpoint appear twice). Only the main process writes anything.

A bucket has no append: in a gs:// workdir the writer keeps the file's lines and
rewrites the object whole at every `sync` (the loop syncs at each evaluation,
each checkpoint save and at exit; the writer also every `sync_every_s`), with
the TensorBoard events written to a local staging folder and uploaded then. A
resumed run drops the bucket's records after the restored step (they are
trained again), so the object holds each step once. A SIGKILL loses what came
after the last sync: at most the steps since the last save, which the resume
trains again anyway.
"""

from __future__ import annotations

import collections
import json
import logging
import numbers
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from kronjax import logfiles, storage
from kronjax.workdir import METRICS, TENSORBOARD, Workdir

__all__ = [
    "PEAK_FLOPS",
    "MetricsWriter",
    "Throughput",
    "device_peak_flops",
    "mfu",
    "read_metrics",
]

log = logging.getLogger(__name__)

METRICS_FILE = METRICS  # in the workdir (kronjax.workdir's layout)
TB_DIR = TENSORBOARD

# Peak dense bf16 FLOP/s per chip, matched as case-insensitive substrings of
# `device.device_kind` in this order (more specific names first).
PEAK_FLOPS: dict[str, float] = {
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e's device_kind
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p's device_kind
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak bf16 FLOP/s of `device` (default: the first), None on CPU or an unknown chip."""
    device = device if device is not None else jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = device.device_kind.lower()
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind:
            return peak
    return None


def mfu(
    tokens_per_s: float, flops_per_token: float, n_devices: int, peak: float | None
) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over `n_devices * peak`; None without a peak."""
    if peak is None or peak <= 0:
        return None
    if n_devices < 1:
        raise ValueError(f"n_devices must be >= 1, got {n_devices}")
    return tokens_per_s * flops_per_token / (n_devices * peak)


class Throughput:
    """Tokens per second over the last `window` ticks.

    JAX dispatches asynchronously, so tick after something that waits for the
    step (e.g. fetching the loss); otherwise the rate measures dispatch.
    """

    def __init__(self, window: int = 20, clock: Callable[[], float] = time.perf_counter) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._clock = clock
        self._marks: collections.deque[tuple[float, int]] = collections.deque(maxlen=window + 1)
        self._tokens = 0
        self._marks.append((clock(), 0))

    def tick(self, n_tokens: int) -> float | None:
        """Record `n_tokens` more processed now; return the windowed rate."""
        self._tokens += int(n_tokens)
        self._marks.append((self._clock(), self._tokens))
        return self.rate()

    def reset(self) -> None:
        """Restart the window (e.g. after compilation or a checkpoint pause)."""
        self._marks.clear()
        self._marks.append((self._clock(), self._tokens))

    def rate(self) -> float | None:
        """Tokens/s between the oldest and newest mark; None before two marks."""
        if len(self._marks) < 2:
            return None
        (t0, n0), (t1, n1) = self._marks[0], self._marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None


def _to_python(key: str, value: Any) -> Any:
    """A JSON-ready scalar from a Python, NumPy or JAX scalar; errors name the key."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    try:
        arr = np.asarray(value)
    except Exception as e:  # noqa: BLE001 - re-raised with the key named
        raise TypeError(f"metric {key!r}: cannot convert {type(value).__name__} to a scalar") from e
    if arr.shape != ():
        raise ValueError(f"metric {key!r} must be a scalar, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return bool(arr)
    if np.issubdtype(arr.dtype, np.integer):
        return int(arr)
    if jnp.issubdtype(arr.dtype, jnp.floating):  # includes bfloat16 and float8
        return float(arr)
    raise TypeError(f"metric {key!r}: unsupported dtype {arr.dtype}")


def _summary_writer() -> Any:
    """tensorboardX's SummaryWriter, imported without torch where torch is not loaded yet:
    tensorboardX imports torch (2-4 s of every run's start when the export extra is
    installed) only to accept torch tensors, and kronjax writes Python floats."""
    import sys

    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # "not installed", for this import
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def parse_records(text: str | bytes, source: str | None = None) -> dict[int, dict[str, Any]]:
    """{step: the last record of that step} of a metrics.jsonl text; a damaged line (cut short
    by a crash, not UTF-8, not a JSON object with an integer step) is skipped, with a warning
    naming `source` and the line where a source is given."""
    by_step: dict[int, dict[str, Any]] = {}
    for rec in logfiles.read_records(text, source or "metrics", warn=source is not None):
        if isinstance(rec.get("step"), int):
            by_step[rec["step"]] = rec
    return by_step


def read_metrics(path: str | os.PathLike[str] | Any) -> list[dict[str, Any]]:
    """metrics.jsonl records sorted by step, the last record kept where a resume repeated one
    (a local path or a gs:// URL; [] if there is no such file). Damaged lines are skipped
    with a warning that names the file and the line: one stray byte never blocks a report."""
    path = storage.as_path(path)
    if not path.is_file():
        return []
    by_step = parse_records(path.read_bytes(), str(path))
    return [by_step[s] for s in sorted(by_step)]


def _ends_mid_line(path: Path) -> bool:
    """True if `path` exists and its last byte is not a newline (a cut-off record)."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


class MetricsWriter:
    """Append metrics to workdir/metrics.jsonl, TensorBoard (workdir/tb) and a tqdm bar.

    Construct on every process with `is_main=jax.process_index() == 0`; the
    others get a writer that does nothing, so the loop needs no branches.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str] | Workdir,
        *,
        is_main: bool,
        total_steps: int,
        initial_step: int = 0,
        use_tensorboard: bool = True,
        progress: bool = True,
        postfix_keys: Sequence[str] = ("loss", "lr", "tokens_per_s", "mfu"),
        sync_every_s: float = 60.0,
        mirror: Any = None,
    ) -> None:
        self.is_main = is_main
        wd = Workdir.at(workdir)
        self.path = wd.metrics
        self._remote = wd.is_remote
        self._tb_remote = wd.tensorboard
        self._postfix_keys = tuple(postfix_keys)
        self._file: TextIO | None = None
        self._lines: list[str] | None = None  # a bucket's metrics.jsonl, rewritten at sync
        self._staging: Path | None = None     # TensorBoard events before their upload
        self._sync_every_s, self._synced_at = sync_every_s, time.monotonic()
        self._mirror = mirror  # another sink of every record (W&B): log(step, rec), finish()
        self._tb: Any = None  # tensorboardX.SummaryWriter, imported only when used
        self._bar: tqdm | None = None
        if not is_main:
            return
        if self._remote:
            self._lines = self._bucket_lines(initial_step)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            needs_newline = _ends_mid_line(self.path)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            if needs_newline:  # a crash cut the last line short; keep it, start a fresh one
                self._file.write("\n")
                self._file.flush()
        if use_tensorboard:
            SummaryWriter = _summary_writer()
            if self._remote:
                self._staging = Path(tempfile.mkdtemp(prefix="kronjax-tb-"))
            logdir = self._staging if self._remote else wd.tensorboard
            self._tb = SummaryWriter(logdir=str(logdir), flush_secs=30)
        if progress:
            self._bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True,
                             unit="step")

    def _bucket_lines(self, initial_step: int) -> list[str]:
        """The bucket's records up to the step the run restarts from (later ones, left by
        a run killed after its last save, are trained again and would appear twice)."""
        if not self.path.exists():
            return []
        lines = []
        for line in self.path.read_bytes().decode("utf-8", "replace").splitlines():
            step = parse_records(line)
            if step and next(iter(step)) <= initial_step:
                lines.append(line + "\n")
        return lines

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record `metrics` at `step`: one JSON line (flushed), scalars to TB, the bar."""
        if not self.is_main:
            return
        if self._file is None and self._lines is None:
            raise RuntimeError("MetricsWriter.write after close()")
        if "step" in metrics:
            raise ValueError("metrics must not contain 'step'; it is passed separately")
        step = int(step)
        record = {k: _to_python(k, v) for k, v in metrics.items()}
        line = json.dumps({"step": step, "time": time.time(), **record})
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
        else:
            assert self._lines is not None
            self._lines.append(line + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
        if self._mirror is not None:
            self._mirror.log(step, record)
        if self._bar is not None:
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            shown = {
                k: record[k] for k in self._postfix_keys if isinstance(record.get(k), (int, float))
            }
            if shown:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        if self._lines is not None and time.monotonic() - self._synced_at > self._sync_every_s:
            self.sync()

    def sync(self) -> None:
        """In a bucket: rewrite metrics.jsonl whole and upload the TensorBoard events (the
        loop calls this at every evaluation and save). On local disk every line is already
        flushed: nothing to do."""
        if self._lines is None:
            return
        storage.write_bytes(self.path, "".join(self._lines).encode("utf-8"))
        if self._tb is not None and self._staging is not None:
            self._tb.flush()
            for f in sorted(self._staging.iterdir()):
                storage.upload(f, self._tb_remote / f.name)
        self._synced_at = time.monotonic()

    def print(self, message: str) -> None:
        """Print a line (main process only) without breaking the progress bar."""
        if self.is_main:
            tqdm.write(message)

    def close(self) -> None:
        """Flush (in a bucket: a last sync) and close everything; safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        try:
            if self._lines is not None:
                self.sync()
        finally:
            self._lines = None
            if self._mirror is not None:
                self._mirror.finish()
                self._mirror = None
            if self._tb is not None:
                self._tb.close()
                self._tb = None
            if self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)
                self._staging = None
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
