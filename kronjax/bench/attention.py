"""`python -m kronjax.bench attention`: this platform's attention kernels against the reference.

Forward + backward of causal self-attention at the model's shape (default GPT-2 124M: 16
sequences of 1024, 12 heads of 64, bfloat16), timed in interleaved rounds, with each compiled
program's temporaries and the largest differences of the outputs and of the three gradients
from the reference (relative to the reference's largest magnitude). --kernels picks the arms:

  auto, reference, cudnn, pallas_triton
               `kronjax.attention.attention` with that implementation (the arm's name says
               which kernel ran: a kernel off its platform runs the reference)
  cudnn_bnth   cuDNN through jax's private fused-attention API with heads-major (BNTH)
               inputs, transposed once outside the timed step: cuDNN's kernel in the other
               layout it takes (GPU only)
  mgpu         Pallas' Mosaic GPU flash attention for Hopper (attention_mgpu), FORWARD ONLY
               (its causal backward is not implemented up to jax 0.11; the result records what
               a gradient attempt said), timed beside the forward of auto and the reference

An arm that cannot be built (no GPU, an older jax, a kernel refusing the shape) is left out
and its error recorded under "errors"; the others still run.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np

KERNELS = ("auto", "reference", "cudnn", "pallas_triton", "cudnn_bnth", "mgpu")
DEFAULT_KERNELS = ("auto", "reference")


def _cudnn_bnth(dt: Any) -> Callable[..., Any]:
    """cuDNN with BxHxTxK operands (jax's private API; absent or moved in some versions)."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    def fn(q: Any, k: Any, v: Any) -> Any:
        return fa.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]),
                                        mask_type=fa.MaskType.CAUSAL, qkv_layout="BNTH")
    return fn


def _mgpu(seq: int) -> Callable[..., Any]:
    """Pallas Mosaic GPU flash attention (Hopper), causal; it takes q already scaled."""
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

    config = mgpu.TuningConfig(block_q=64, block_kv=min(128, seq), max_concurrent_steps=2,
                               causal=True)

    def fn(q: Any, k: Any, v: Any) -> Any:
        scale = jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
        return mgpu.attention(q * scale, k, v, config)
    return fn


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {e or '(no message)'}"[:300]


def _rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def run_attention(batch: int, seq: int, heads: int, head_dim: int, dtype: str, reps: int,
                  warmup: int, seed: int = 0, kernels: tuple[str, ...] = DEFAULT_KERNELS
                  ) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from kronjax import attention
    from kronjax.bench.timing import Arm, jax_arm, machine_info, time_interleaved

    dt = jnp.dtype(dtype)
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v, cot = (jax.random.normal(key, (batch, seq, heads, head_dim), jnp.float32)
                    .astype(dt) for key in keys)
    platform = jax.devices()[0].platform
    heads_major = [jnp.swapaxes(a, 1, 2) for a in (q, k, v, cot)]

    def make(name: str) -> tuple[Callable[..., Any], bool]:
        """(fn of BxTxHxK q, k, v -> y, whether its inputs are heads-major)."""
        if name == "cudnn_bnth":
            return _cudnn_bnth(dt), True
        if name == "mgpu":
            return _mgpu(seq), False
        return (lambda q, k, v: attention.attention(q, k, v, dt, implementation=name)), False

    def loss(fn: Callable[..., Any], bnth: bool) -> Callable[..., Any]:
        c = heads_major[3] if bnth else cot

        def f(qkv: tuple[Any, ...]) -> Any:
            return jnp.sum(fn(*qkv).astype(jnp.float32) * c.astype(jnp.float32))
        return f

    arms: list[Arm] = []
    errors: dict[str, str] = {}
    outputs: dict[str, tuple[Any, Any]] = {}  # arm -> (y, grads), in BxTxHxK
    names = list(dict.fromkeys([*kernels, "reference"]))  # the reference is the baseline
    for name in names:
        try:
            fn, bnth = make(name)
            inputs = tuple(heads_major[:3]) if bnth else (q, k, v)
            back = (lambda a: jnp.swapaxes(a, 1, 2)) if bnth else (lambda a: a)
            label = (f"{name} ({attention.kernel_for(platform, seq, head_dim, dt, name)})"
                     if name in attention.IMPLEMENTATIONS and name != "reference" else name)
            if name == "mgpu":
                y = jax.jit(lambda x, fn=fn: fn(*x))(inputs)
                outputs[label + " fwd"] = (y, None)
                try:
                    jax.jit(jax.grad(loss(fn, bnth)))(inputs)
                except Exception as e:  # noqa: BLE001 - recorded: the backward's status
                    errors["mgpu fwd+bwd"] = _error(e)
                arms.append(_forward_arm(label + " fwd", fn, inputs))
                continue
            arm = jax_arm(label, loss(fn, bnth), inputs)
            y = jax.jit(lambda x, fn=fn: fn(*x))(inputs)
            grads = jax.jit(jax.grad(loss(fn, bnth)))(inputs)
            outputs[label] = (back(y), tuple(back(g) for g in grads))
            arms.append(arm)
        except Exception as e:  # noqa: BLE001 - one kernel's failure leaves the others
            errors[name] = _error(e)
    if "mgpu" in kernels:  # forward-only comparators for the forward-only arm
        for name in ("auto", "reference"):
            fn, _ = make(name)
            arms.append(_forward_arm(f"{name} fwd", fn, (q, k, v)))
    time_interleaved(arms, reps, warmup)

    rows = [a.summary() for a in arms]
    base = {r["arm"]: r["median_ms"] for r in rows}
    for r in rows:
        ref = base.get("reference fwd" if r["arm"].endswith(" fwd") else "reference")
        r["ratio_vs_reference"] = r["median_ms"] / ref if ref else None
    ref_y, ref_g = outputs.get("reference", (None, None))
    diffs: dict[str, dict[str, float]] = {}
    for label, (y, grads) in outputs.items():
        if label == "reference" or ref_y is None:
            continue
        diffs[label] = {"output": _rel(y, ref_y)}
        if grads is not None:
            diffs[label].update({f"d{n}": _rel(a, b) for n, a, b in zip("qkv", grads, ref_g)})
    return {"benchmark": "attention", "machine": machine_info(), "platform": platform,
            "kernel": attention.kernel_for(platform, seq, head_dim, dt),
            "shape": {"batch": batch, "seq": seq, "heads": heads, "head_dim": head_dim,
                      "dtype": dt.name}, "kernels": list(kernels), "arms": rows,
            "max_rel_diff": diffs, "errors": errors}


def _forward_arm(name: str, fn: Callable[..., Any], inputs: tuple[Any, ...]) -> Any:
    import jax

    from kronjax.bench.timing import Arm, memory_bytes

    jitted = jax.jit(lambda x: fn(*x))
    arm = Arm(name, lambda: None, *memory_bytes(jitted, inputs), note="forward only")
    arm.step = lambda: jax.block_until_ready(jitted(inputs))
    return arm


def format_attention(result: dict[str, Any]) -> str:
    s = result["shape"]
    lines = [f"attention fwd+bwd, {s['batch']} x {s['seq']} x {s['heads']} heads x "
             f"{s['head_dim']} ({s['dtype']}) on {result['platform']}: auto runs "
             f"{result['kernel']}", "| arm | median ms | IQR ms | temp MiB | x reference |",
             "|---|---|---|---|---|"]
    for r in result["arms"]:
        temp = "n/a" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.1f}"
        ratio = "n/a" if r["ratio_vs_reference"] is None else f"{r['ratio_vs_reference']:.3f}"
        lines.append(f"| {r['arm']} | {r['median_ms']:.3f} | {r['iqr_ms']:.3f} | {temp} | "
                     f"{ratio} |")
    for label, d in result["max_rel_diff"].items():
        lines.append(f"max |{label} - reference| / max |reference|: " + ", ".join(
            f"{k} {v:.2e}" for k, v in d.items()))
    for name, err in result["errors"].items():
        lines.append(f"not run: {name}: {err}")
    return "\n".join(lines)


def kernel_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if text.strip() == "all":
        return KERNELS
    bad = [n for n in names if n not in KERNELS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"kernels must be 'all' or a comma-separated list of "
                                         f"{', '.join(KERNELS)}; got {text!r}")
    return names


def cmd_attention(args: argparse.Namespace) -> int:
    result = run_attention(args.batch, args.seq, args.heads, args.head_dim, args.dtype,
                           args.reps, args.warmup, args.seed, args.kernels)
    print(json.dumps(result) if args.json else format_attention(result))
    return 0
