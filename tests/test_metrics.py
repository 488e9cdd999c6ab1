"""Metrics: durable JSONL, TensorBoard events, MFU arithmetic, tokens/s."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from kronjax import metrics
from kronjax.metrics import MetricsWriter, Throughput


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_jsonl_lines_parse_with_given_keys(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, is_main=True, total_steps=10, progress=False) as w:
        w.write(1, {"loss": jnp.asarray(3.5), "lr": np.float32(1e-3), "tokens_per_s": 1234.0})
        w.write(2, {"loss": jnp.asarray(3.25, jnp.bfloat16), "n": np.int64(7), "ok": True})
        # Flushed per line: readable before close.
        assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 2
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[0]["step"] == 1 and rows[0]["loss"] == 3.5 and rows[0]["tokens_per_s"] == 1234.0
    assert rows[0]["lr"] == pytest.approx(1e-3)
    assert rows[1] == {**rows[1], "step": 2, "loss": 3.25, "n": 7, "ok": True}
    assert isinstance(rows[1]["n"], int) and "time" in rows[1]


def test_reopen_appends_and_repairs_cut_line(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, is_main=True, total_steps=10, progress=False,
                       use_tensorboard=False) as w:
        w.write(1, {"loss": 1.0})
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')  # a crash mid-write
    with MetricsWriter(tmp_path, is_main=True, total_steps=10, initial_step=1,
                       progress=False, use_tensorboard=False) as w:
        w.write(2, {"loss": 0.5})
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["step"] == 1
    assert lines[1] == '{"step": 2, "lo'  # kept, not truncated
    assert json.loads(lines[2])["loss"] == 0.5


def test_non_main_writes_nothing(tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    with MetricsWriter(workdir, is_main=False, total_steps=10) as w:
        w.write(1, {"loss": 1.0})
        w.print("hidden")
    assert not workdir.exists()


def _tb_scalars(path: Path) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in a TensorBoard event file, read record by record
    (TFRecord framing: u64 length, u32 crc, payload, u32 crc) with tensorboardX's own proto."""
    from tensorboardX.proto.event_pb2 import Event

    data, at, out = path.read_bytes(), 0, []
    while at < len(data):
        n = int.from_bytes(data[at:at + 8], "little")
        event = Event.FromString(data[at + 12:at + 12 + n])
        at += 12 + n + 4
        out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    return out


def test_tensorboard_event_file(tmp_path: Path) -> None:
    """Every numeric metric becomes a scalar at its step; text stays in the JSONL only."""
    with MetricsWriter(tmp_path, is_main=True, total_steps=3, progress=False) as w:
        w.write(1, {"loss": 2.0, "note": "text is jsonl-only"})
        w.write(3, {"loss": 1.5, "lr": 0.25})
    (events,) = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert sorted(_tb_scalars(events)) == [(1, "loss", 2.0), (3, "loss", 1.5), (3, "lr", 0.25)]


def test_progress_bar_tracks_step(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path, is_main=True, total_steps=100, initial_step=40,
                      use_tensorboard=False)
    assert w._bar is not None and w._bar.n == 40
    w.write(45, {"loss": 1.5, "lr": 1e-3, "tokens_per_s": 1e5})
    assert w._bar.n == 45 and "loss" in str(w._bar.postfix)
    w.close()
    w.close()  # idempotent


def test_bad_metrics_are_named(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, is_main=True, total_steps=3, progress=False,
                       use_tensorboard=False) as w:
        with pytest.raises(ValueError, match="'vec' must be a scalar"):
            w.write(1, {"vec": jnp.ones(3)})
        with pytest.raises(ValueError, match="'step'"):
            w.write(1, {"step": 1})
    with pytest.raises(RuntimeError, match="after close"):
        w.write(2, {"loss": 1.0})


def test_flops_and_mfu_arithmetic() -> None:
    # GPT-2 124M-ish: N=85M non-embedding, 12 layers, 12 heads x 64, T=1024.
    from kronjax.model import GPTConfig, flops_per_token

    config = GPTConfig(50304, 1024, 12, 12, 768)
    fpt = flops_per_token(config, 85_000_000)
    assert fpt == 6 * 85_000_000 + 12 * 12 * 12 * 64 * 1024
    assert metrics.mfu(2.0e5, fpt, 4, 989e12) == pytest.approx(2.0e5 * fpt / (4 * 989e12))
    assert metrics.mfu(1e5, fpt, 1, None) is None
    with pytest.raises(ValueError, match="n_devices"):
        metrics.mfu(1e5, fpt, 0, 1e12)
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(config, 1, -1)


@pytest.mark.parametrize(
    "kind, platform, peak",
    [
        ("NVIDIA H100 80GB HBM3", "gpu", 989e12),
        ("NVIDIA H100 PCIe", "gpu", 756e12),
        ("NVIDIA H200", "gpu", 989e12),
        ("NVIDIA A100-SXM4-80GB", "gpu", 312e12),
        ("TPU v4", "tpu", 275e12),
        ("TPU v5 lite", "tpu", 197e12),
        ("TPU v5", "tpu", 459e12),
        ("TPU v6 lite", "tpu", 918e12),
        ("Some Future Chip", "gpu", None),
        ("cpu", "cpu", None),
    ],
)
def test_device_peak_flops(kind: str, platform: str, peak: float | None) -> None:
    assert metrics.device_peak_flops(SimpleNamespace(device_kind=kind, platform=platform)) == peak


def test_device_peak_flops_default_device_on_cpu() -> None:
    import jax

    if jax.devices()[0].platform == "cpu":
        assert metrics.device_peak_flops() is None


def test_throughput_window() -> None:
    now = [0.0]
    tp = Throughput(window=2, clock=lambda: now[0])
    assert tp.rate() is None
    for t, n in [(1.0, 100), (2.0, 100), (3.0, 400)]:
        now[0] = t
        tp.tick(n)
    # Window of 2 ticks: from t=1 (100 tokens) to t=3 (600 tokens).
    assert tp.rate() == pytest.approx(500 / 2.0)
    now[0] = 10.0
    tp.reset()
    assert tp.rate() is None
    now[0] = 11.0
    assert tp.tick(50) == pytest.approx(50.0)
