"""Timing side by side: the machine, interleaved rounds of arms, and compiled memory."""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


# -- machine -------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    import jax

    dev = jax.devices()[0]
    info: dict[str, Any] = {
        "cpu": _cpu_model(), "processor": platform.processor(), "arch": platform.machine(),
        "cores": cpu_cores(), "jax_backend": jax.default_backend(),
        "device_kind": dev.device_kind, "device_count": jax.device_count(),
        "python": platform.python_version(), "jax": jax.__version__,
    }
    try:
        import flax

        info["flax"] = flax.__version__
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def machine_line(info: dict[str, Any]) -> str:
    load = info.get("loadavg_at_start")
    return (f"machine: {info['cpu']} ({info['arch']}), {info['cores']} cores; "
            f"jax {info['jax']} on {info['jax_backend']} ({info['device_kind']})"
            + (f"; load avg {load[0]:.2f}" if load else ""))


# -- timing --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Arm:
    """One thing to time: `step()` runs one full call and blocks until it is done."""

    name: str
    step: Callable[[], Any]
    temp_bytes: int | None = None
    output_bytes: int | None = None
    note: str = ""
    slow: bool = False  # takes part in only the first `slow_reps` rounds
    times_ms: list[float] = dataclasses.field(default_factory=list)
    loss: float | None = None

    def summary(self) -> dict[str, Any]:
        t = np.asarray(self.times_ms, np.float64)
        q25, med, q75 = (np.percentile(t, q) for q in (25, 50, 75)) if t.size else (np.nan,) * 3
        return {"arm": self.name, "median_ms": float(med), "q25_ms": float(q25),
                "q75_ms": float(q75), "iqr_ms": float(q75 - q25),
                "min_ms": float(t.min()) if t.size else float("nan"), "reps": int(t.size),
                "times_ms": [round(float(x), 3) for x in t], "temp_bytes": self.temp_bytes,
                "output_bytes": self.output_bytes, "loss": self.loss, "note": self.note}


@dataclasses.dataclass
class StepArm(Arm):
    """An Arm that is one full train step of a model, with what is needed for its row."""

    tokens: int = 0               # per step
    flops_per_token: float | None = None
    params: dict[str, int] | None = None
    memory: dict[str, int | None] | None = None


def time_interleaved(arms: Sequence[Arm], reps: int, warmup: int = 1,
                     slow_reps: int | None = None, slow_s: float = 1.0) -> None:
    """Warm every arm up, then time them in `reps` interleaved rounds (into arm.times_ms).

    An arm already marked slow, or whose last warm-up call took over `slow_s` seconds, runs
    only the first `slow_reps` rounds (None: all), so seconds-long arms don't dominate.
    """
    for arm in arms:
        for _ in range(max(warmup, 1)):
            t0 = time.perf_counter()
            arm.step()
        arm.slow = arm.slow or (time.perf_counter() - t0) > slow_s
    for r in range(reps):
        for arm in arms:
            if arm.slow and slow_reps is not None and r >= slow_reps:
                continue
            t0 = time.perf_counter()
            arm.step()
            arm.times_ms.append((time.perf_counter() - t0) * 1e3)


def memory_stats(compiled: Any) -> dict[str, int | None]:
    """Per-device bytes of a compiled step (XLA memory_analysis); None where not reported.

    peak: arguments + outputs not aliased to (donated) arguments + temporaries, all that the
    step needs live at once (an upper bound). xla_peak: XLA's own peak_memory_in_bytes,
    where the backend reports one (XLA:CPU's leaves the temporaries out).
    """
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - backends may not implement it
        stats = None
    out: dict[str, int | None] = {}
    for key in ("temp", "argument", "output", "alias", "xla_peak"):
        name = "peak_memory_in_bytes" if key == "xla_peak" else f"{key}_size_in_bytes"
        value = getattr(stats, name, None) if stats is not None else None
        out[key] = int(value) if value is not None else None
    out["xla_peak"] = out["xla_peak"] or None
    parts = (out["argument"], out["output"], out["temp"])
    out["peak"] = (None if None in parts
                   else out["argument"] + out["output"] - (out["alias"] or 0) + out["temp"])
    return out


def memory_bytes(jitted: Any, *args: Any) -> tuple[int | None, int | None]:
    """(temp, output) bytes of the compiled computation; None where XLA won't say."""
    try:
        compiled = jitted.lower(*args).compile()
    except Exception:  # noqa: BLE001 - backends may not implement it
        return None, None
    stats = memory_stats(compiled)
    return stats["temp"], stats["output"]


def jax_arm(name: str, loss_fn: Callable[..., Any], params: Any, *args: Any,
            note: str = "") -> Arm:
    """value_and_grad(loss_fn) w.r.t. params, jitted; params and args are jit arguments."""
    import jax

    fn = jax.jit(jax.value_and_grad(loss_fn))
    arm = Arm(name, lambda: None, *memory_bytes(fn, params, *args), note=note)

    def step() -> None:
        loss, grads = fn(params, *args)
        jax.block_until_ready((loss, grads))
        arm.loss = float(loss)

    arm.step = step
    return arm
