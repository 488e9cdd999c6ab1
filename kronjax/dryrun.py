"""`python -m kronjax.train --dry_run`: compile the train step ahead of time, report memory.

The step is lowered for the configured mesh on abstract inputs (ShapeDtypeStructs carrying
their shardings): no data is loaded and no parameter is materialised. `--topology cpu:N`
simulates N CPU devices; a Cloud TPU accelerator type (v4-8, v5litepod-16) or PLATFORM:NAME
compiles for devices that jax.experimental.topologies describes without having them
(kronjax.topology; TPUs need libtpu). Memory figures are XLA's `memory_analysis()` of the
compiled step, per device, set against the chip's HBM where it is known; `cost` is XLA's
`cost_analysis()` of the same program.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from kronjax import mesh as mesh_lib
from kronjax import optim
from kronjax import run as run_lib
from kronjax import topology as topology_lib
from kronjax.attention import kernel_for
from kronjax.model import param_counts
from kronjax.step import table_once_per_step


class DryRunError(RuntimeError):
    """A dry run that cannot proceed as asked (a topology or tokenizer it cannot get)."""


def dry_run_vocab(cfg: ml_collections.ConfigDict, vocab_size: int | None = None
                  ) -> tuple[int, run_lib.VocabFn, str]:
    """kronjax.run.resolve_vocab for a dry run: the real tokenizer when it can be had (the
    prepared data, or the named encoding), else a SYNTHETIC vocabulary of the right size,
    which compiles the same program (one gather per byte)."""
    try:
        return run_lib.resolve_vocab(cfg, "auto", vocab_size=vocab_size, stand_in="synthetic")
    except ValueError as e:
        raise DryRunError(f"dry run: {e} (--vocab_size N compiles with a synthetic "
                          "vocabulary)") from e


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def dry_run(cfg: ml_collections.ConfigDict, *, topology: str | None = None,
            vocab_size: int | None = None, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Compile the train step for the configured mesh on abstract inputs; report memory.

    No data is loaded and no parameter is materialised: shapes come from jax.eval_shape, and
    the step is lowered on ShapeDtypeStructs carrying their shardings. Returns the numbers.
    """
    devices = topology_lib.topology_devices(topology)
    n_tok, make_vocab, vocab_note = dry_run_vocab(cfg, vocab_size)
    model = run_lib.build_model(cfg, n_tok, make_vocab)
    mcfg = model.config
    tx, schedule = optim.from_config(cfg)
    plan = run_lib.make_plan(cfg, model, tx, devices)
    params = plan.abstract["params"]
    counts = param_counts(params, mcfg)
    batch = {k: jax.ShapeDtypeStruct(plan.micro_shape, jnp.int32, sharding=plan.micro_sh)
             for k in ("inputs", "targets")}
    key = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=mesh_lib.replicated(plan.mesh))
    t0 = time.perf_counter()
    compiled = plan.step_fn(model, tx, schedule).lower(plan.abstract, batch, rng).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    report: dict[str, Any] = {
        "mesh": {a: plan.mesh.shape[a] for a in mesh_lib.MESH_AXES},
        "devices": len(devices), "platform": devices[0].platform,
        "device_kind": devices[0].device_kind, "vocab": vocab_note,
        "vocab_size": mcfg.vocab_size, "params": counts,
        "state_bytes_per_device": {"params": mesh_lib.shard_bytes(params),
                                   "opt_state": mesh_lib.shard_bytes(plan.abstract["opt_state"])},
        "micro_batch": list(plan.micro_shape), "compile_s": round(seconds, 1),
        "vocab_parallel_ce": run_lib.use_vocab_parallel_ce(cfg, plan.mesh),
        "ce_chunk_tokens": plan.ce_chunk,
        "table_once_per_step": table_once_per_step(model, plan.micro_shape[0]),
        "attention": kernel_for(devices[0].platform, plan.micro_shape[2], mcfg.head_dim,
                                mcfg.dtype, mcfg.attention, mcfg.dropout > 0),
    }
    if mem is not None:
        fields = {"argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
                  "temp": mem.temp_size_in_bytes, "alias": mem.alias_size_in_bytes,
                  "generated_code": mem.generated_code_size_in_bytes}
        fields["total"] = fields["argument"] + fields["output"] + fields["temp"] - fields["alias"]
        report["memory_per_device"] = fields
        if (hbm := topology_lib.hbm_bytes(devices)) is not None:
            report["hbm_per_device"] = hbm
            report["fits"] = fields["total"] <= hbm
    report["cost"] = step_cost(compiled)
    a, bm, t = plan.micro_shape
    out(f"dry run: arm {mcfg.arm}, {len(devices)} x {devices[0].device_kind} "
        f"({devices[0].platform}), mesh {report['mesh']}")
    out(f"vocabulary: {vocab_note}; model vocab_size {mcfg.vocab_size} (padded)")
    out("params: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    sb = report["state_bytes_per_device"]
    out(f"state per device: params {_gib(sb['params'])}, opt_state {_gib(sb['opt_state'])}")
    fused = (f"head + cross-entropy fused in {report['ce_chunk_tokens']}-token chunks"
             if report["ce_chunk_tokens"] else "logits materialised")
    if report["table_once_per_step"]:
        fused += "; kron_tied's codec table once per step"
    out(f"step: {a} micro-batch(es) of {bm} x {t} tokens (global batch {a * bm}); "
        f"vocab-parallel cross-entropy {report['vocab_parallel_ce']}; {fused}; "
        f"attention {report['attention']}; "
        f"compiled in {seconds:.1f} s")
    if mem is None:
        out("memory_analysis: not available on this backend")
    else:
        out("compiled step memory per device: " + ", ".join(
            f"{k} {_gib(v)}" for k, v in report["memory_per_device"].items()))
    if "hbm_per_device" in report:
        total, hbm = report["memory_per_device"]["total"], report["hbm_per_device"]
        out(f"{'fits' if report['fits'] else 'DOES NOT FIT'}: {_gib(total)} of "
            f"{_gib(hbm)} HBM per chip ({100 * total / hbm:.1f}%)")
    if report["cost"]:
        out("XLA cost analysis of the step, per device: " + ", ".join(
            f"{k} {v:.4g}" for k, v in report["cost"].items()))
    return report


COST_KEYS = ("flops", "bytes accessed", "transcendentals")


def step_cost(compiled: Any) -> dict[str, float]:
    """XLA's own estimate of the compiled step (per device): flops, bytes, transcendentals."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without cost analysis reports none
        return {}
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    return {k: float(cost[k]) for k in COST_KEYS if k in (cost or {})}
