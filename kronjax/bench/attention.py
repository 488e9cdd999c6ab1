"""`python -m kronjax.bench attention`: this platform's attention kernel against the reference.

Forward + backward of causal self-attention at the model's shape (default GPT-2 124M: 16
sequences of 1024, 12 heads of 64, bfloat16), for `kronjax.attention.attention` with
implementation "auto" (the platform's kernel: splash on TPU, cuDNN on GPU, the reference on
CPU) and "reference" (`layers.causal_attention`), timed in interleaved rounds, with each
compiled program's temporaries and the largest differences of the outputs and of the three
gradients from the reference (relative to the reference's largest magnitude).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np


def run_attention(batch: int, seq: int, heads: int, head_dim: int, dtype: str, reps: int,
                  warmup: int, seed: int = 0) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from kronjax import attention
    from kronjax.bench.timing import jax_arm, machine_info, time_interleaved

    dt = jnp.dtype(dtype)
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v, cot = (jax.random.normal(key, (batch, seq, heads, head_dim), jnp.float32)
                    .astype(dt) for key in keys)

    def loss(impl: str) -> Any:
        def fn(qkv: tuple[jax.Array, ...]) -> jax.Array:
            y = attention.attention(*qkv, dt, implementation=impl)
            return jnp.sum(y.astype(jnp.float32) * cot.astype(jnp.float32))
        return fn

    platform = jax.devices()[0].platform
    kernel = attention.kernel_for(platform, seq, head_dim, dt)
    arms = [jax_arm(f"auto ({kernel})", loss("auto"), (q, k, v)),
            jax_arm("reference", loss("reference"), (q, k, v))]
    time_interleaved(arms, reps, warmup)
    outs = {impl: jax.jit(lambda x, impl=impl: attention.attention(*x, dt, implementation=impl))(
        (q, k, v)) for impl in ("auto", "reference")}
    grads = {impl: jax.jit(jax.grad(loss(impl)))((q, k, v)) for impl in ("auto", "reference")}

    def rel(a: Any, b: Any) -> float:
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

    diffs = {"output": rel(outs["auto"], outs["reference"])}
    diffs.update({f"d{name}": rel(a, b) for name, a, b in
                  zip("qkv", grads["auto"], grads["reference"])})
    rows = [a.summary() for a in arms]
    base = rows[1]["median_ms"]
    for r in rows:
        r["ratio_vs_reference"] = r["median_ms"] / base if base else None
    return {"machine": machine_info(), "platform": platform, "kernel": kernel,
            "shape": {"batch": batch, "seq": seq, "heads": heads, "head_dim": head_dim,
                      "dtype": dt.name}, "arms": rows, "max_rel_diff": diffs}


def format_attention(result: dict[str, Any]) -> str:
    s = result["shape"]
    lines = [f"attention fwd+bwd, {s['batch']} x {s['seq']} x {s['heads']} heads x "
             f"{s['head_dim']} ({s['dtype']}) on {result['platform']}: kernel "
             f"{result['kernel']}", "| arm | median ms | IQR ms | temp MiB | x reference |",
             "|---|---|---|---|---|"]
    for r in result["arms"]:
        temp = "n/a" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.1f}"
        lines.append(f"| {r['arm']} | {r['median_ms']:.3f} | {r['iqr_ms']:.3f} | {temp} | "
                     f"{r['ratio_vs_reference']:.3f} |")
    lines.append("max |auto - reference| / max |reference|: " + ", ".join(
        f"{k} {v:.2e}" for k, v in result["max_rel_diff"].items()))
    return "\n".join(lines)


def cmd_attention(args: argparse.Namespace) -> int:
    result = run_attention(args.batch, args.seq, args.heads, args.head_dim, args.dtype,
                           args.reps, args.warmup, args.seed)
    print(json.dumps(result) if args.json else format_attention(result))
    return 0
