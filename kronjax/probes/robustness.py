"""Typo robustness: how far one misspelled word moves a model's next-token prediction.

`python -m kronjax.probes robustness --workdirs A B [--pairs FILE.jsonl] [--out DIR]`

Each pair is a prompt in clean and typo form ({"category", "clean", "typo"}). At the last
position of each, per checkpoint:
  kl          KL(p_clean || p_typo) of the next-token distributions, in nats
  cosine      cosine of the final hidden states (after the last LayerNorm, what the head reads)
  logp_drop   log p_clean(t*) - log p_typo(t*), t* the clean prompt's top-1 token
  top1_kept   whether the typo prompt's top-1 token is still t*
Distributions are over the tokenizer's ids only (the vocabulary padding is masked out, as no
text can contain it). A prompt longer than the block keeps its last block_size tokens and is
marked `truncated`. The default pairs (data/robustness_pairs.jsonl) are 120 original
sentence prefixes in 12 typo categories, each typo a 1-2 character edit of one content word.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kronjax.probes import common

log = logging.getLogger(__name__)

DEFAULT_PAIRS = common.DATA_DIR / "robustness_pairs.jsonl"
METRICS = ("kl", "cosine", "logp_drop", "top1_kept")
OUTPUTS = ("robustness.json", "robustness.md")


def read_pairs(path: str | Path = DEFAULT_PAIRS
               ) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """(usable pairs, skipped) of a JSONL file whose lines need string fields category, clean
    and typo. A pair whose clean and typo texts are identical measures nothing (KL 0, top-1
    kept) and would flatter every average: skipped, with a warning naming its line, not a
    refusal of the whole list (researchers' lists have such pairs; the authors' 110 has one).
    A malformed line is still an error naming its line."""
    usable, skipped = [], []
    for line, p in common.read_jsonl_lines(path, ("category", "clean", "typo")):
        pair = {k: p[k] for k in ("category", "clean", "typo")}
        if pair["clean"] == pair["typo"]:
            skipped.append({"line": line, "reason": "identical clean and typo", **pair})
        else:
            usable.append(pair)
    if skipped:
        log.warning("%s: %d pair(s) with identical clean and typo text left out (line %s)",
                    path, len(skipped), ", ".join(str(s["line"]) for s in skipped))
    if not usable:
        raise ValueError(f"{path}: no pair has a typo that differs from its clean text")
    return usable, skipped


def load_pairs(path: str | Path = DEFAULT_PAIRS) -> list[dict[str, str]]:
    """The usable pairs of a JSONL file (see read_pairs)."""
    return read_pairs(path)[0]


def pair_metrics(logits_clean_NxV: np.ndarray, logits_typo_NxV: np.ndarray,
                 hidden_clean_NxD: np.ndarray, hidden_typo_NxD: np.ndarray,
                 n_valid: int | None = None) -> dict[str, np.ndarray]:
    """The four per-pair numbers from last-position logits and hidden states (pure NumPy).

    n_valid: only ids below it count (the tokenizer's vocabulary; padding ids are masked).
    """
    v = logits_clean_NxV.shape[-1] if n_valid is None else int(n_valid)
    lp_c = common.log_softmax(np.asarray(logits_clean_NxV)[:, :v])
    lp_t = common.log_softmax(np.asarray(logits_typo_NxV)[:, :v])
    kl = (np.exp(lp_c) * (lp_c - lp_t)).sum(-1)
    top_c = lp_c.argmax(-1)
    rows = np.arange(len(top_c))
    return {"kl": np.maximum(kl, 0.0),  # exact KL is >= 0; clip float rounding of ~-1e-16
            "cosine": common.cosine_rows(hidden_clean_NxD, hidden_typo_NxD),
            "logp_drop": lp_c[rows, top_c] - lp_t[rows, top_c],
            "top1_kept": lp_t.argmax(-1) == top_c,
            "top1_clean": top_c, "top1_typo": lp_t.argmax(-1)}


def evaluate(ckpt: common.Checkpoint, pairs: Sequence[Mapping[str, str]]) -> list[dict[str, Any]]:
    """Per-pair records for one checkpoint (one batched forward over all prompts)."""
    run = ckpt.run
    block = run.model.config.block_size
    seqs, truncated = [], []
    for p in pairs:
        fitted = [common.fit_block(run.tokenizer.encode(p[k]), block) for k in ("clean", "typo")]
        seqs += [f[0] for f in fitted]
        truncated.append(fitted[0][1] or fitted[1][1])
    out = common.last_position(run, seqs)
    m = pair_metrics(out["logits"][0::2], out["logits"][1::2], out["hidden"][0::2],
                     out["hidden"][1::2], run.tokenizer.vocab_size)
    records = []
    for i, p in enumerate(pairs):
        records.append({
            "checkpoint": ckpt.label, "arm": ckpt.arm, "step": ckpt.run.step, **p,
            "kl": float(m["kl"][i]), "cosine": float(m["cosine"][i]),
            "logp_drop": float(m["logp_drop"][i]), "top1_kept": bool(m["top1_kept"][i]),
            "top1_clean": run.tokenizer.decode([int(m["top1_clean"][i])]),
            "top1_typo": run.tokenizer.decode([int(m["top1_typo"][i])]),
            "truncated": truncated[i]})
    return records


def summarise(records: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Means per checkpoint (overall) and per checkpoint x category."""
    def row(group: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {"n": len(group), **{k: common.mean(float(r[k]) for r in group) for k in METRICS},
                "truncated": sum(bool(r["truncated"]) for r in group)}
    overall = [{"checkpoint": k[0], "arm": k[1], "step": k[2], **row(g)}
               for k, g in common.group_by(records, "checkpoint", "arm", "step").items()]
    cats = [{"checkpoint": k[0], "category": k[1], **row(g)}
            for k, g in common.group_by(records, "checkpoint", "category").items()]
    return {"overall": overall, "categories": cats}


def to_markdown(summary: Mapping[str, Sequence[Mapping[str, Any]]], pairs_file: str,
                skipped: Sequence[Mapping[str, Any]] = ()) -> str:
    """Overall and per-category tables; a note on pairs left out of them."""
    cols = ["KL(clean‖typo)", "cos(hidden)", "logp drop", "top-1 kept"]
    overall = common.markdown_table(
        ["checkpoint", "arm", "step", "pairs", *cols],
        [[r["checkpoint"], r["arm"], r["step"], r["n"], *(r[k] for k in METRICS)]
         for r in summary["overall"]])
    cats = common.markdown_table(
        ["checkpoint", "category", "pairs", *cols],
        [[r["checkpoint"], r["category"], r["n"], *(r[k] for k in METRICS)]
         for r in summary["categories"]])
    n_trunc = sum(r["truncated"] for r in summary["overall"])
    note = (f"\n\n{n_trunc} pair evaluations were cut to the block size (see `truncated` in "
            "robustness.json).") if n_trunc else ""
    if skipped:
        note += (f"\n\n{len(skipped)} pair(s) left out of every average: identical clean and "
                 f"typo text (line {', '.join(str(s['line']) for s in skipped)} of the pairs "
                 "file; `skipped` in robustness.json).")
    return (f"## Typo robustness\n\npairs: `{pairs_file}`; next-token distributions at the last "
            f"position; KL and log-prob drop in nats; cosine of the final hidden states.\n\n"
            f"### Overall\n\n{overall}\n\n### Per category\n\n{cats}{note}\n")


def run(workdirs: Sequence[str | Path], pairs_file: str | Path = DEFAULT_PAIRS,
        out: str | Path | None = None, force: bool = False) -> dict[str, Any]:
    """Evaluate every checkpoint on every pair; write robustness.{json,md} when out is set."""
    out_dir = common.prepare_out(out, OUTPUTS, force)
    pairs, skipped = read_pairs(pairs_file)
    ckpts = common.load_checkpoints(workdirs)
    records = [r for c in ckpts for r in evaluate(c, pairs)]
    summary = summarise(records)
    result = {"pairs_file": str(pairs_file), "checkpoints": [c.describe() for c in ckpts],
              "pairs_used": len(pairs), "pairs_skipped": len(skipped), "skipped": skipped,
              **summary, "records": records}
    result["markdown"] = to_markdown(summary, str(pairs_file), skipped)
    if out_dir is not None:
        common.write_json(out_dir / "robustness.json",
                          {k: v for k, v in result.items() if k != "markdown"})
        common.write_text(out_dir / "robustness.md", result["markdown"])
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kronjax.probes robustness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdirs", nargs="+", required=True, help="kronjax.train run directories")
    p.add_argument("--pairs", default=str(DEFAULT_PAIRS), help="JSONL of category/clean/typo")
    p.add_argument("--out", default=None, help="write robustness.json and .md here")
    p.add_argument("--force", action="store_true", help="replace results already in --out")
    args = p.parse_args(argv)
    result = run(args.workdirs, args.pairs, args.out, args.force)
    print(result["markdown"])
    return 0
