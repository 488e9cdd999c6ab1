"""Generation probe: completions of prompts whose key word is normal, misspelled or novel.

`python -m kronjax.probes generation --workdirs A B [--prompts FILE.jsonl] [--out DIR]`

Each prompt line is {"id", "template" (with one "{slot}"), "word", "typo", "novel"}; slot
words carry their leading space, as tokens do. Three forms per prompt:
  normal      the template with `word`
  misspelled  the template with `typo`
  oov         `novel` (a made-up word): on Kronecker arms it is embedded from its bytes at
              ONE position by the byte override (a word with no token); table arms cannot do
              that, so they read it tokenized normally, marked oov_mode="tokenized"
Each form is completed greedily and by nucleus sampling (T=0.7, p=0.9, fixed seed). The echo
rate is how often the completion contains the form's word (stripped, case-sensitive): does
the model pick up and reuse a novel or misspelled word?
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kronjax.embed import ByteOverride
from kronjax.generate import OOV_MARK, encode_prompt
from kronjax.model import GPT
from kronjax.probes import common
from kronjax.run import Loaded
from kronjax.vocab import encode_bytes, truncate

DEFAULT_PROMPTS = common.DATA_DIR / "prompts.jsonl"
SLOT = "{slot}"
FORMS = ("normal", "misspelled", "oov")
DECODINGS = {"greedy": (0.0, 1.0), "top_p": (0.7, 0.9)}  # name -> (temperature, top_p)
OUTPUTS = ("generation.jsonl", "generation.json", "generation.md")


def load_prompts(path: str | Path = DEFAULT_PROMPTS) -> list[dict[str, str]]:
    """Prompt records; each template must hold exactly one {slot}."""
    prompts = common.read_jsonl(path, ("id", "template", "word", "typo", "novel"))
    for p in prompts:
        if p["template"].count(SLOT) != 1:
            raise ValueError(f"{path}: prompt {p['id']!r} must contain {SLOT} exactly once; "
                             f"got {p['template']!r}")
    return prompts


def echoes(completion: str, word: str) -> bool:
    """Whether the completion reproduces the word (leading/trailing space ignored)."""
    return word.strip() in completion


def build_prompt(run: Loaded, prompt: Mapping[str, str], form: str
                 ) -> tuple[list[int], tuple[int, bytes] | None, str, str | None]:
    """(ids, override, word, oov_mode) of one prompt form for this run's arm."""
    word = {"normal": prompt["word"], "misspelled": prompt["typo"], "oov": prompt["novel"]}[form]
    if form == "oov" and run.model.config.is_kron:
        ids, oov = encode_prompt(run.tokenizer, prompt["template"].replace(SLOT, OOV_MARK), word)
        return ids, oov, word, "byte_override"
    ids = run.tokenizer.encode(prompt["template"].replace(SLOT, word))
    return ids, None, word, "tokenized" if form == "oov" else None


def generate_batch(run: Loaded, prompts: Sequence[Sequence[int]], n_new: int, *,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                   oov: Sequence[tuple[int, bytes] | None] | None = None) -> list[list[int]]:
    """`kronjax.generate.generate` for many prompts at once (same tokens, one compile).

    Rows are right-padded; each reads its own last position, and the per-step random key
    is shared across rows exactly as generate() uses it for a single prompt. A row gets
    min(n_new, block_size - its length) new tokens, so long prompts stop at the block's end.
    """
    cfg = run.model.config
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    if len(lengths) == 0 or lengths.min() < 1 or lengths.max() >= cfg.block_size:
        raise ValueError(f"every prompt needs 1..{cfg.block_size - 1} tokens (block_size "
                         f"{cfg.block_size} minus room for one new token)")
    if n_new < 1:
        raise ValueError(f"n_new must be >= 1; got {n_new}")
    b = len(prompts)
    buf = np.zeros((b, cfg.block_size), np.int32)
    for i, p in enumerate(prompts):
        buf[i, :len(p)] = p
    if oov is not None:
        cfg.require_kron()
    override = None
    if cfg.is_kron:  # always an override on kron arms (all-false mask = none): one compile
        rows = np.zeros((b, cfg.block_size, cfg.pos_dim), np.uint8)
        lens = np.zeros((b, cfg.block_size), np.int32)
        mask = np.zeros((b, cfg.block_size), bool)
        for i, o in enumerate(oov or []):
            if o is not None:
                r, ln = encode_bytes([o[1]], cfg.pos_dim)
                rows[i, o[0]], lens[i, o[0]], mask[i, o[0]] = r[0], ln[0], True
        override = (rows, lens, mask)
    step = _step_fn(run.model)
    temp_j, top_p_j = jnp.float32(temperature), jnp.float32(top_p)
    rng = jax.random.key(seed)
    n_row = np.minimum(n_new, cfg.block_size - lengths)
    buf_j = jnp.asarray(buf)
    for i in range(int(n_row.max())):
        active = i < n_row
        pos = np.where(active, lengths - 1 + i, 0).astype(np.int32)
        buf_j = step(run.params, buf_j, jnp.asarray(pos), jnp.asarray(active), override,
                     jax.random.fold_in(rng, i), temp_j, top_p_j)
    out = np.asarray(buf_j)
    return [out[i, :lengths[i] + n_row[i]].tolist() for i in range(b)]


def pick_token(logits_V: jax.Array, rng: jax.Array, temperature: jax.Array,
               top_p: jax.Array) -> jax.Array:
    """`kronjax.sample._next_token` with traced settings: greedy where temperature <= 0,
    else the same nucleus draw (same ops, same key), so one compile serves both decodings."""
    greedy = jnp.argmax(logits_V)
    scaled = logits_V / jnp.where(temperature > 0, temperature, 1.0)
    order = jnp.argsort(-scaled)
    probs = jax.nn.softmax(scaled[order])
    keep = jnp.cumsum(probs) - probs < top_p  # always keeps the top token
    masked = jnp.where(keep, scaled[order], -jnp.inf)
    sampled = order[jax.random.categorical(rng, masked)]
    return jnp.where(temperature > 0, sampled, greedy)


@functools.lru_cache(maxsize=16)
def _step_fn(model: GPT) -> Any:
    """One jitted decoding step for all rows, cached per model (modules hash by value)."""
    @jax.jit
    def step(params: Any, buf_BxT: jax.Array, pos_B: jax.Array, active_B: jax.Array,
             override: Any, rng: jax.Array, temperature: jax.Array, top_p: jax.Array
             ) -> jax.Array:
        ov = None if override is None else ByteOverride(*override)
        logits = model.apply({"params": params}, buf_BxT, override=ov)
        rows = jnp.arange(buf_BxT.shape[0])
        tok_B = jax.vmap(pick_token, in_axes=(0, None, None, None))(
            logits[rows, pos_B], rng, temperature, top_p)
        old_B = buf_BxT[rows, pos_B + 1]
        return buf_BxT.at[rows, pos_B + 1].set(jnp.where(active_B, tok_B, old_B))
    return step


def evaluate(ckpt: common.Checkpoint, prompts: Sequence[Mapping[str, str]], n_new: int,
             seed: int) -> list[dict[str, Any]]:
    """One record per prompt x form x decoding for one checkpoint."""
    run = ckpt.run
    records = []
    for form in FORMS:
        built = [build_prompt(run, p, form) for p in prompts]
        block = run.model.config.block_size
        if too_long := [p["id"] for p, b in zip(prompts, built) if len(b[0]) >= block]:
            raise ValueError(f"prompts {too_long} ({form} form) leave no room to generate in "
                             f"block_size {block}: shorten them")
        overrides = [b[1] for b in built]
        for name, (temp, top_p) in DECODINGS.items():
            outs = generate_batch(run, [b[0] for b in built], n_new, temperature=temp,
                                  top_p=top_p, seed=seed,
                                  oov=overrides if any(overrides) else None)
            for p, (ids, ov, word, mode), out in zip(prompts, built, outs):
                text = run.tokenizer.decode(out[len(ids):])
                rec = {"checkpoint": ckpt.label, "arm": ckpt.arm, "step": run.step,
                       "id": p["id"], "form": form, "decoding": name, "temperature": temp,
                       "top_p": top_p, "seed": seed, "word": word, "oov_mode": mode,
                       "prompt": p["template"].replace(SLOT, word), "completion": text,
                       "new_tokens": len(out) - len(ids), "echo": echoes(text, word)}
                if ov is not None:
                    used = truncate(ov[1], run.model.config.pos_dim)
                    rec["oov_bytes_used"] = used.decode("utf-8", "replace")
                    rec["oov_truncated"] = len(used) < len(ov[1])
                elif mode == "tokenized":
                    rec["oov_tokens"] = len(run.tokenizer.encode(word))
                records.append(rec)
    return records


def summarise(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Echo rate per checkpoint x form x decoding."""
    groups = common.group_by(records, "checkpoint", "arm", "form", "decoding")
    return [{"checkpoint": k[0], "arm": k[1], "form": k[2], "decoding": k[3], "n": len(g),
             "oov_mode": g[0]["oov_mode"], "echo_rate": common.mean(r["echo"] for r in g)}
            for k, g in groups.items()]


def to_markdown(summary: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]],
                examples: int = 3) -> str:
    """Echo-rate table plus a few greedy completions of the oov form."""
    by = {(r["checkpoint"], r["form"], r["decoding"]): r for r in summary}
    rows = []
    for (ck, form) in dict.fromkeys((r["checkpoint"], r["form"]) for r in summary):
        g, t = by.get((ck, form, "greedy")), by.get((ck, form, "top_p"))
        ref = g or t
        rows.append([ck, ref["arm"], form, ref["oov_mode"] or "", ref["n"],
                     g and g["echo_rate"], t and t["echo_rate"]])
    table = common.markdown_table(["checkpoint", "arm", "form", "oov mode", "prompts",
                                   "echo (greedy)", "echo (top-p)"], rows)
    shown = [r for r in records if r["form"] == "oov" and r["decoding"] == "greedy"]
    seen: dict[str, int] = {}
    lines = []
    for r in shown:
        if seen.setdefault(r["checkpoint"], 0) < examples:
            seen[r["checkpoint"]] += 1
            lines.append(f"- `{r['checkpoint']}` ({r['oov_mode']}): {r['prompt']!r} → "
                         f"{r['completion']!r}")
    return ("## Generation\n\nEcho = the completion contains the form's word. Top-p: T=0.7, "
            f"p=0.9, fixed seed.\n\n{table}\n\n### Forced-OOV completions (greedy)\n\n"
            + "\n".join(lines) + "\n")


def run(workdirs: Sequence[str | Path], prompts_file: str | Path = DEFAULT_PROMPTS,
        out: str | Path | None = None, *, n_new: int = 24, seed: int = 0,
        force: bool = False) -> dict[str, Any]:
    """Generate for every checkpoint; write generation.{jsonl,json,md} when out is set."""
    out_dir = common.prepare_out(out, OUTPUTS, force)
    if n_new < 1:
        raise ValueError(f"--tokens must be >= 1; got {n_new}")
    prompts = load_prompts(prompts_file)
    ckpts = common.load_checkpoints(workdirs)
    records = [r for c in ckpts for r in evaluate(c, prompts, n_new, seed)]
    summary = summarise(records)
    md = to_markdown(summary, records)
    if out_dir is not None:
        common.write_text(out_dir / "generation.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        common.write_json(out_dir / "generation.json",
                          {"prompts_file": str(prompts_file), "seed": seed, "n_new": n_new,
                           "checkpoints": [c.describe() for c in ckpts], "summary": summary})
        common.write_text(out_dir / "generation.md", md)
    return {"records": records, "summary": summary, "markdown": md,
            "checkpoints": [c.describe() for c in ckpts]}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kronjax.probes generation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdirs", nargs="+", required=True, help="kronjax.train run directories")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS),
                   help="JSONL of id/template/word/typo/novel")
    p.add_argument("--tokens", type=int, default=24, help="new tokens per completion (capped "
                   "by the block size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the top-p sampling")
    p.add_argument("--out", default=None, help="write generation.{jsonl,json,md} here")
    p.add_argument("--force", action="store_true", help="replace results already in --out")
    args = p.parse_args(argv)
    print(run(args.workdirs, args.prompts, args.out, n_new=args.tokens, seed=args.seed,
              force=args.force)["markdown"])
    return 0
