"""Embedding geometry: are a word's nearest neighbours its spellings or its relatives?

`python -m kronjax.probes geometry [--workdirs A B] [--codec 8,16] [--matrix FILE
 --tokenizer SPEC [--key NAME]] [--layers 0,1] [--k 5] [--words FILE.jsonl] [--out DIR]`

Probe items: each word family (run, runs, running, runner) in six typographic forms
(run, " run", Run, " Run", RUN, "(run"). For an item, its typographic variants are the other
forms of the same word, its morphological relatives the forms of the family's other words;
the rest are unrelated. With cosine k-nearest neighbours (self excluded):
  typo@k      mean fraction of an item's k neighbours that are its typographic variants
  morph@k     the same for its morphological relatives
  anisotropy  mean cosine over all pairs of distinct items (high = one shared direction)
  chance      the expected typo@k / morph@k of random neighbours, for scale
Sources: a checkpoint's input embeddings (table arms: rows of wte, so only words that are one
token, the rest listed as skipped; Kronecker arms: embed_bytes of each word's bytes, so any
word, cut to pos_dim bytes), the raw codec (reference z vectors at a pos_dim), or an external
(V, d) matrix (.npy or .safetensors) with its tokenizer (tiktoken:NAME or a sentencepiece
.model; single-token words only). `--layers` repeats it on checkpoints' residual stream after
those blocks: each word runs as its own token sequence and the last position is read.
With no source given, the raw codec at pos_dim 16 is probed.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from kronjax import codec
from kronjax.data.tokenizers import Tokenizer, load_tokenizer
from kronjax.probes import common
from kronjax.vocab import encode_bytes

DEFAULT_WORDS = common.DATA_DIR / "geometry_words.jsonl"
TYPO_FORMS = ("{w}", " {w}", "{W}", " {W}", "{U}", "({w}")
OUTPUTS = ("geometry.json", "geometry.md")


@dataclasses.dataclass(frozen=True)
class Item:
    """One probe string: `lemma` is the word it spells, `family` the word's family."""

    text: str
    lemma: str
    family: str


def load_families(path: str | Path = DEFAULT_WORDS) -> list[dict[str, Any]]:
    """Families {"family": name, "forms": [words]} from JSONL; each needs >= 2 forms."""
    path = Path(path)
    fams = common.read_jsonl(path, ("family",))
    for f in fams:
        forms = f.get("forms")
        if not isinstance(forms, list) or len(forms) < 2 or not all(
                isinstance(w, str) and w for w in forms):
            raise ValueError(f"{path}: family {f['family']!r} needs 'forms': a list of >= 2 "
                             f"non-empty words (its morphological relatives); got {forms!r}")
    return fams


def probe_items(families: Sequence[Mapping[str, Any]], forms: Sequence[str] = TYPO_FORMS
                ) -> list[Item]:
    """Every family word in every typographic form; a string made twice is kept once."""
    items: dict[str, Item] = {}
    for fam in families:
        for word in fam["forms"]:
            for tmpl in forms:
                text = tmpl.format(w=word, W=word[:1].upper() + word[1:], U=word.upper())
                items.setdefault(text, Item(text, word, fam["family"]))
    return list(items.values())


def neighbour_scores(vectors_NxD: np.ndarray, items: Sequence[Item], k: int) -> dict[str, Any]:
    """typo@k, morph@k, their chance levels and anisotropy (cosine; pure NumPy)."""
    n = len(items)
    if n != len(vectors_NxD):
        raise ValueError(f"{len(vectors_NxD)} vectors for {n} items")
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if n < 2:
        return {"n_items": n, "k": 0, "typo_at_k": None, "morph_at_k": None,
                "typo_chance": None, "morph_chance": None, "anisotropy": None}
    x = np.asarray(vectors_NxD, np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    sim = x @ x.T
    off = ~np.eye(n, dtype=bool)
    anisotropy = float(sim[off].mean())
    lemma = np.array([f"{it.family}\0{it.lemma}" for it in items])
    family = np.array([it.family for it in items])
    same_lemma = (lemma[:, None] == lemma[None, :]) & off
    same_family = (family[:, None] == family[None, :]) & off & ~same_lemma
    k_eff = min(k, n - 1)
    sim_masked = np.where(off, sim, -np.inf)
    nn = np.argsort(-sim_masked, axis=1, kind="stable")[:, :k_eff]
    rows = np.arange(n)[:, None]
    return {"n_items": n, "k": k_eff,
            "typo_at_k": float(same_lemma[rows, nn].mean()),
            "morph_at_k": float(same_family[rows, nn].mean()),
            "typo_chance": float(same_lemma.sum(1).mean() / (n - 1)),
            "morph_chance": float(same_family.sum(1).mean() / (n - 1)),
            "anisotropy": anisotropy}


def codec_vectors(items: Sequence[Item], pos_dim: int) -> np.ndarray:
    """Reference z vectors (the fixed codec, no learned projection) of each item's bytes."""
    rows, lengths = encode_bytes([it.text.encode() for it in items], pos_dim)
    return codec.reference_codec(rows, lengths)


def single_token_rows(tokenizer: Tokenizer, items: Sequence[Item], n_rows: int
                      ) -> tuple[list[int], list[int], list[str]]:
    """(kept item indices, their token ids, skipped texts): items that are exactly one token."""
    keep, ids, skipped = [], [], []
    for i, it in enumerate(items):
        toks = tokenizer.encode(it.text)
        if len(toks) != 1:
            skipped.append(it.text)
            continue
        if toks[0] >= n_rows:
            raise ValueError(f"{tokenizer.spec} gives {it.text!r} id {toks[0]}, but the matrix "
                             f"has only {n_rows} rows: is this the matrix's tokenizer?")
        keep.append(i)
        ids.append(toks[0])
    return keep, ids, skipped


def kron_input_vectors(ckpt: common.Checkpoint, items: Sequence[Item]) -> np.ndarray:
    """embed_bytes of each item's bytes through the run's learned projection."""
    run = ckpt.run
    rows, lengths = encode_bytes([it.text.encode() for it in items], run.model.config.pos_dim)
    out = run.model.apply({"params": run.params}, jnp.asarray(rows), jnp.asarray(lengths),
                          method=lambda m, r, ln: m.kron.embed_bytes(r, ln))
    return np.asarray(out)


def load_matrix(path: str | Path, key: str | None = None) -> np.ndarray:
    """A (V, d) matrix from .npy or .safetensors (key: which tensor; default the only 2-D one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding matrix {path} does not exist")
    if path.suffix == ".npy":
        mat = np.load(path, allow_pickle=False)
    elif path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        two_d = {k: v.shape for k, v in tensors.items() if v.ndim == 2}
        if key is None:
            if len(two_d) != 1:
                raise ValueError(f"{path} holds {len(two_d)} 2-D tensors {two_d}: name one "
                                 f"with --key")
            key = next(iter(two_d))
        if key not in tensors:
            raise KeyError(f"{path} has no tensor {key!r}; its tensors: "
                           f"{ {k: v.shape for k, v in tensors.items()} }")
        mat = tensors[key]
    else:
        raise ValueError(f"{path}: expected a .npy or .safetensors file")
    if mat.ndim != 2:
        raise ValueError(f"{path}: the embedding matrix must be 2-D (V, d); got {mat.shape}")
    return np.asarray(mat, np.float32)


def _row(source: str, kind: str, layer: str, scores: Mapping[str, Any],
         skipped: Sequence[str] = (), truncated: Sequence[str] = ()) -> dict[str, Any]:
    return {"source": source, "kind": kind, "layer": layer, **scores,
            "skipped": list(skipped), "truncated": list(truncated)}


def probe_checkpoint(ckpt: common.Checkpoint, items: Sequence[Item], k: int,
                     layers: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Input-embedding rows (and block outputs for `layers`) for one run."""
    run = ckpt.run
    rows = []
    if ckpt.is_kron:
        pos_dim = run.model.config.pos_dim
        cut = [it.text for it in items if len(it.text.encode()) > pos_dim]
        vecs = kron_input_vectors(ckpt, items)
        rows.append(_row(ckpt.label, f"{ckpt.arm} (embed_bytes)", "input",
                         neighbour_scores(vecs, items, k), truncated=cut))
    else:
        table = np.asarray(run.params["wte"]["embedding"])
        keep, ids, skipped = single_token_rows(run.tokenizer, items, run.tokenizer.vocab_size)
        kept = [items[i] for i in keep]
        vecs = table[ids] if ids else np.zeros((0, table.shape[1]), np.float32)
        rows.append(_row(ckpt.label, f"{ckpt.arm} (table rows)", "input",
                         neighbour_scores(vecs, kept, k), skipped=skipped))
    if layers:
        block = run.model.config.block_size
        seqs = [common.fit_block(run.tokenizer.encode(it.text), block)[0] for it in items]
        out = common.last_position(run, seqs, layers=layers)
        for layer in layers:
            rows.append(_row(ckpt.label, f"{ckpt.arm} (tokens)", f"block {layer}",
                             neighbour_scores(out[f"block{layer}"], items, k)))
    return rows


def probe_codec(items: Sequence[Item], pos_dim: int, k: int) -> dict[str, Any]:
    cut = [it.text for it in items if len(it.text.encode()) > pos_dim]
    return _row(f"codec (pos_dim {pos_dim})", "raw codec z", "input",
                neighbour_scores(codec_vectors(items, pos_dim), items, k), truncated=cut)


def probe_matrix(matrix: np.ndarray, tokenizer: Tokenizer, items: Sequence[Item], k: int,
                 name: str) -> dict[str, Any]:
    keep, ids, skipped = single_token_rows(tokenizer, items, matrix.shape[0])
    kept = [items[i] for i in keep]
    return _row(name, f"table ({tokenizer.spec})", "input",
                neighbour_scores(matrix[ids], kept, k), skipped=skipped)


def to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    table = common.markdown_table(
        ["source", "kind", "layer", "items", "skipped", "k", "typo@k", "morph@k",
         "typo chance", "morph chance", "anisotropy"],
        [[r["source"], r["kind"], r["layer"], r["n_items"], len(r["skipped"]), r["k"],
          r["typo_at_k"], r["morph_at_k"], r["typo_chance"], r["morph_chance"],
          r["anisotropy"]] for r in rows])
    notes = []
    for r in rows:
        if r["skipped"]:
            shown = ", ".join(repr(s) for s in r["skipped"][:8])
            more = f" (+{len(r['skipped']) - 8} more)" if len(r["skipped"]) > 8 else ""
            notes.append(f"- {r['source']} / {r['layer']}: skipped {len(r['skipped'])} items "
                         f"that are not one token: {shown}{more}")
        if r["truncated"]:
            notes.append(f"- {r['source']} / {r['layer']}: {len(r['truncated'])} items longer "
                         "than pos_dim bytes were cut to it")
    return ("## Embedding geometry\n\ntypo@k / morph@k: fraction of an item's k cosine "
            "neighbours that are its typographic variants / morphological relatives.\n\n"
            + table + ("\n\n" + "\n".join(notes) if notes else "") + "\n")


def run(*, workdirs: Sequence[str | Path] = (), codec_pos_dims: Sequence[int] = (),
        matrix: str | Path | None = None, tokenizer: str | None = None,
        key: str | None = None, layers: Sequence[int] = (), k: int = 5,
        words: str | Path = DEFAULT_WORDS, out: str | Path | None = None,
        force: bool = False) -> dict[str, Any]:
    """Probe every requested source; write geometry.{json,md} when out is set."""
    if (matrix is None) != (tokenizer is None):
        raise ValueError("--matrix and --tokenizer go together: the tokenizer says which row "
                         "is which word (tiktoken:NAME or sentencepiece:PATH / a .model file)")
    if layers and not workdirs:
        raise ValueError("--layers probes hidden states of checkpoints: give --workdirs")
    if not workdirs and not codec_pos_dims and matrix is None:
        codec_pos_dims = (16,)
    out_dir = common.prepare_out(out, OUTPUTS, force)
    items = probe_items(load_families(words))
    rows = [probe_codec(items, int(p), k) for p in codec_pos_dims]
    for ckpt in common.load_checkpoints(workdirs) if workdirs else []:
        rows += probe_checkpoint(ckpt, items, k, layers)
    if matrix is not None:
        spec = tokenizer if ":" in tokenizer else f"sentencepiece:{tokenizer}"
        rows.append(probe_matrix(load_matrix(matrix, key), load_tokenizer(spec), items, k,
                                 Path(matrix).name))
    result = {"words_file": str(words), "k": k, "forms": list(TYPO_FORMS),
              "n_items": len(items), "rows": rows, "markdown": to_markdown(rows)}
    if out_dir is not None:
        common.write_json(out_dir / "geometry.json",
                          {k_: v for k_, v in result.items() if k_ != "markdown"})
        common.write_text(out_dir / "geometry.md", result["markdown"])
    return result


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{what} must be comma-separated integers; got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kronjax.probes geometry", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdirs", nargs="*", default=[], help="kronjax.train run directories")
    p.add_argument("--codec", type=lambda s: _ints(s, "--codec"), default=[],
                   help="probe the raw codec at these pos_dims, e.g. 8,16")
    p.add_argument("--matrix", default=None, help="external (V, d) embedding .npy/.safetensors")
    p.add_argument("--tokenizer", default=None,
                   help="the matrix's tokenizer: tiktoken:NAME or sentencepiece:PATH")
    p.add_argument("--key", default=None, help="tensor name inside a .safetensors file")
    p.add_argument("--layers", type=lambda s: _ints(s, "--layers"), default=[],
                   help="also probe checkpoints' block outputs, e.g. 0,1")
    p.add_argument("--k", type=int, default=5, help="neighbours per item (default 5)")
    p.add_argument("--words", default=str(DEFAULT_WORDS), help="JSONL of word families")
    p.add_argument("--out", default=None, help="write geometry.json and .md here")
    p.add_argument("--force", action="store_true", help="replace results already in --out")
    args = p.parse_args(argv)
    print(run(workdirs=args.workdirs, codec_pos_dims=args.codec, matrix=args.matrix,
              tokenizer=args.tokenizer, key=args.key, layers=args.layers, k=args.k,
              words=args.words, out=args.out, force=args.force)["markdown"])
    return 0
