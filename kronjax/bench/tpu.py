"""`python -m kronjax.bench tpu`: the train step compiled for TPU slices, per arm, on this host.

Nothing runs on a TPU: XLA's TPU compiler (libtpu, the `tpu` extra) compiles the step for the
devices `jax.experimental.topologies` describes, as `python -m kronjax.train --dry_run` does,
once per (slice, arm). The table gives the compiled step's memory per chip against the chip's
HBM, the largest per-chip micro-batch that fits at the config's global batch, and XLA's cost
analysis with the kron arms' ratios (kron / bpe_untied, kron_tied / bpe_tied).

Largest micro-batch: the step is compiled at the config's micro-batch and at twice (or half)
that; memory is linear in the micro-batch to a few MiB, so the line through the two points
predicts the largest power-of-two micro-batch (dividing the global batch) under the HBM. That
prediction is then compiled for the first arm (column "checked"); the other arms use the
slope with their own intercept (their difference is the input side's state, not the
activations). Cost analysis counts a Pallas kernel (the splash attention) as a custom call of
almost no flops: compare ratios between arms, not absolute flops with the model's.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

FIT_TYPES = ("v4-8", "v5litepod-8", "v5litepod-16", "v5p-8", "v6e-8")
COST_PAIRS = (("kron", "bpe_untied"), ("kron_tied", "bpe_tied"))


def batch_devices(cfg: ml_collections.ConfigDict, topology: str) -> int:
    """Devices a micro-batch is split over on `topology`: all but the tensor axis."""
    from kronjax import mesh as mesh_lib
    from kronjax import topology as topology_lib

    n = len(topology_lib.topology_devices(topology))
    shape = dict(zip(mesh_lib.MESH_AXES,
                     mesh_lib.mesh_shape(mesh_lib.mesh_sizes_from_config(cfg), n)))
    return shape["data"] * shape["fsdp"]


def compile_step(cfg: ml_collections.ConfigDict, topology: str, arm: str,
                 per_chip: int | None = None) -> dict[str, Any]:
    """dry_run of cfg's step for `arm` on `topology`, at `per_chip` sequences per batch
    device per micro-batch (None: the config's grad_accum)."""
    from kronjax import dryrun

    c = ml_collections.ConfigDict(cfg.to_dict())
    c.model.arm = arm
    n = batch_devices(c, topology)
    if per_chip is not None:
        batch = int(c.train.batch_size)
        if batch % (per_chip * n):
            raise ValueError(f"{per_chip} sequences on each of {n} devices do not divide the "
                             f"global batch {batch}")
        c.train.grad_accum = batch // (per_chip * n)
    rep = dryrun.dry_run(c, topology=topology, out=lambda _: None)
    rep["per_chip"] = rep["micro_batch"][1] // n
    rep["arm"], rep["type"] = arm, topology
    return rep


def candidates(batch: int, n_devices: int) -> list[int]:
    """Per-device micro-batches (powers of two) whose micro-batch divides the global batch."""
    out, b = [], 1
    while b * n_devices <= batch:
        if batch % (b * n_devices) == 0:
            out.append(b)
        b *= 2
    return out


def predict_largest(points: Sequence[tuple[int, float]], hbm: float,
                    allowed: Sequence[int]) -> int | None:
    """The largest allowed micro-batch whose memory, on the line through two (micro-batch,
    bytes) points, is at most hbm; None if not even the smallest fits."""
    (b0, m0), (b1, m1) = points[:2]
    slope = (m1 - m0) / (b1 - b0)
    fitting = [b for b in allowed if m0 + slope * (b - b0) <= hbm]
    return max(fitting) if fitting else None


def fit_slice(cfg: ml_collections.ConfigDict, topology: str, arms: Sequence[str],
              log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One row per arm for one slice: memory at the config's micro-batch, the largest."""
    rows = []
    first = compile_step(cfg, topology, arms[0])
    n = batch_devices(cfg, topology)
    b0, hbm = first["per_chip"], float(first["hbm_per_device"])
    allowed = candidates(int(cfg.train.batch_size), n)
    above, below = [b for b in allowed if b > b0], [b for b in allowed if b < b0]
    b1 = min(above) if above else max(below) if below else None
    mem = lambda r: float(r["memory_per_device"]["total"])  # noqa: E731
    slope, checked = 0.0, None
    if b1 is not None:
        log(f"{topology} {arms[0]}: {mem(first) / 2**30:.2f} GiB at {b0}/chip; compiling at "
            f"{b1}/chip for the slope")
        second = compile_step(cfg, topology, arms[0], b1)
        slope = (mem(second) - mem(first)) / (b1 - b0)
        largest = predict_largest([(b0, mem(first)), (b1, mem(second))], hbm, allowed)
        while largest is not None and largest not in (b0, b1):
            log(f"{topology} {arms[0]}: compiling the predicted largest micro-batch "
                f"{largest}/chip")
            check = compile_step(cfg, topology, arms[0], largest)
            if mem(check) <= hbm:
                checked = (largest, mem(check))
                break
            largest = max([b for b in allowed if b < largest], default=None)
    for i, arm in enumerate(arms):
        rep = first if i == 0 else compile_step(cfg, topology, arm)
        log(f"{topology} {arm}: {mem(rep) / 2**30:.2f} GiB of {hbm / 2**30:.0f} GiB")
        own = [b for b in allowed if mem(rep) + slope * (b - b0) <= hbm
               and (b1 is not None or b == b0)]
        rows.append({
            "type": topology, "arm": arm, "devices": rep["devices"], "mesh": rep["mesh"],
            "device_kind": rep["device_kind"], "hbm_gib": hbm / 2**30,
            "per_chip": b0, "grad_accum": rep["micro_batch"][0],
            "memory_gib": mem(rep) / 2**30, "fits": mem(rep) <= hbm,
            "largest_per_chip": max(own) if own else None,
            "largest_checked_gib": (checked[1] / 2**30 if i == 0 and checked else None),
            "slope_gib_per_seq": slope / 2**30, "attention": rep["attention"],
            "cost": rep["cost"], "compile_s": rep["compile_s"]})
    return rows


def cost_ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per slice, kron / bpe_untied and kron_tied / bpe_tied of XLA's flops and bytes."""
    out = []
    by = {(r["type"], r["arm"]): r for r in rows}
    for t in dict.fromkeys(r["type"] for r in rows):
        for arm, ref in COST_PAIRS:
            a, b = by.get((t, arm)), by.get((t, ref))
            if a and b and a["cost"] and b["cost"]:
                out.append({"type": t, "pair": f"{arm} / {ref}", **{
                    k: a["cost"][k] / b["cost"][k] for k in a["cost"] if b["cost"].get(k)}})
    return out


def format_tables(rows: Sequence[dict[str, Any]], ratios: Sequence[dict[str, Any]]) -> str:
    lines = ["| slice | arm | chips | mesh (data, fsdp, tensor) | micro-batch / chip x accum | "
             "memory / chip | HBM | fits | largest micro-batch / chip | attention |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["mesh"]
        largest = "none" if r["largest_per_chip"] is None else str(r["largest_per_chip"])
        if r["largest_checked_gib"] is not None:
            largest += f" (compiled: {r['largest_checked_gib']:.2f} GiB)"
        lines.append(f"| {r['type']} | {r['arm']} | {r['devices']} | {m['data']}, {m['fsdp']}, "
                     f"{m['tensor']} | {r['per_chip']} x {r['grad_accum']} | "
                     f"{r['memory_gib']:.2f} GiB | {r['hbm_gib']:.0f} GiB | "
                     f"{'yes' if r['fits'] else 'NO'} | {largest} | {r['attention']} |")
    lines += ["", "| slice | ratio | flops | bytes accessed | transcendentals |",
              "|---|---|---|---|---|"]
    for q in ratios:
        lines.append(f"| {q['type']} | {q['pair']} | {q.get('flops', float('nan')):.4f} | "
                     f"{q.get('bytes accessed', float('nan')):.4f} | "
                     f"{q.get('transcendentals', float('nan')):.4f} |")
    return "\n".join(lines)


def cmd_tpu(args: argparse.Namespace) -> int:
    import sys

    from kronjax import config as config_lib

    cfg = config_lib.build_config(args.config or config_lib.REPO_CONFIGS / "gpt2_124m.py",
                                  args.overrides)
    log = (lambda s: print(s, file=sys.stderr, flush=True))
    rows: list[dict[str, Any]] = []
    for t in args.types:
        rows += fit_slice(cfg, t, args.arms, log)
    ratios = cost_ratios(rows)
    print(json.dumps({"rows": rows, "ratios": ratios}) if args.json
          else format_tables(rows, ratios))
    return 0
