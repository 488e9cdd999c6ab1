"""What the probes share: loading runs, batched last-position forwards, safe output, tables.

The forward pads a batch of token sequences on the right and reads each row at its own last
position: attention is causal, so the padding after a row's end cannot change what that row
sees, and one compiled program serves prompts of every length.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kronjax import storage
from kronjax.data.corpora import json_lines
from kronjax.embed import ByteOverride
from kronjax.model import GPT
from kronjax.run import Loaded, load_run
from kronjax.vocab import encode_bytes

DATA_DIR = Path(__file__).resolve().parent / "data"
CHUNK = 64  # rows per forward; a fixed batch shape means one compile per sequence length


@dataclasses.dataclass
class Checkpoint:
    """A loaded run plus the label the tables use for it."""

    label: str
    workdir: Any          # a local Path, or an epath.Path for a gs:// run
    run: Loaded

    @property
    def arm(self) -> str:
        return self.run.model.config.arm

    @property
    def is_kron(self) -> bool:
        return self.run.model.config.is_kron

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "workdir": str(self.workdir), "arm": self.arm,
                "step": self.run.step}


def _parts(workdir: str | Path) -> tuple[str, ...]:
    path = storage.as_path(workdir)
    if isinstance(path, Path):
        return path.resolve().parts
    return tuple(os.fspath(path).rstrip("/").split("/"))


def labels_for(workdirs: Sequence[str | Path]) -> list[str]:
    """Short unique labels: the directory name, or more of the path where names clash."""
    paths = [_parts(w) for w in workdirs]
    for depth in range(1, max((len(p) for p in paths), default=1) + 1):
        labels = ["/".join(p[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    raise ValueError(f"the same workdir is given twice: {[str(w) for w in workdirs]}")


def load_checkpoints(workdirs: Sequence[str | Path]) -> list[Checkpoint]:
    """Load every run (latest checkpoint); errors name the workdir that failed."""
    if not workdirs:
        raise ValueError("no --workdirs given: pass one or more kronjax.train run directories")
    out = []
    for label, w in zip(labels_for(workdirs), workdirs):
        try:
            run = load_run(w)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"cannot load run {w}: {e}") from e
        out.append(Checkpoint(label, storage.as_path(w), run))
    return out


def read_jsonl(path: str | Path, required: Sequence[str]) -> list[dict[str, Any]]:
    """Records of a JSONL file; a bad line is an error naming the file, line and key."""
    return [rec for _, rec in read_jsonl_lines(path, required)]


def read_jsonl_lines(path: str | Path, required: Sequence[str]
                     ) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of a JSONL file, for messages about a record that is read fine
    but cannot be used; a bad line is an error naming the file, line and key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected a JSONL file)")
    records: list[tuple[int, dict[str, Any]]] = []
    for n, rec in json_lines(path):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in required if not isinstance(rec.get(k), str) or not rec[k]]
        if missing:
            raise ValueError(f"{path}:{n}: needs non-empty string fields {list(required)}; "
                             f"missing or empty: {missing}")
        records.append((n, rec))
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def fit_block(ids: Sequence[int], block: int) -> tuple[list[int], bool]:
    """Keep the last `block` tokens (the end is what the next-token probes read)."""
    ids = list(ids)
    return (ids[-block:], True) if len(ids) > block else (ids, False)


@functools.lru_cache(maxsize=16)
def _forward_fn(model: GPT, layers: tuple[int, ...]) -> Any:
    """Jitted last-position forward, cached per model (modules hash by config and vocab)."""
    @jax.jit
    def fwd(params: Any, ids_BxT: jax.Array, last_B: jax.Array,
            override: ByteOverride | None) -> dict[str, jax.Array]:
        out = model.apply({"params": params}, ids_BxT, override=override, return_hidden=True)
        rows = jnp.arange(ids_BxT.shape[0])
        res = {"logits": out["logits"][rows, last_B], "hidden": out["hidden"][rows, last_B]}
        for layer in layers:
            res[f"block{layer}"] = out["blocks"][layer][rows, last_B]
        return res
    return fwd


def last_position(run: Loaded, seqs: Sequence[Sequence[int]], *, layers: Sequence[int] = (),
                  override_bytes: Sequence[tuple[int, bytes] | None] | None = None,
                  chunk: int = CHUNK) -> dict[str, np.ndarray]:
    """Logits (N, V), final-LN hidden (N, D) and chosen block outputs at each row's last token.

    Sequences must fit the block; `override_bytes[i] = (position, word)` embeds `word` from
    its bytes at that position of row i (Kronecker arms only).
    """
    block = run.model.config.block_size
    if not seqs:
        raise ValueError("no sequences to run")
    if any(len(s) == 0 or len(s) > block for s in seqs):
        raise ValueError(f"every sequence needs 1..{block} tokens (the model's block_size)")
    n_layer = run.model.config.n_layer
    if bad := [layer for layer in layers if not 0 <= layer < n_layer]:
        raise ValueError(f"layers {bad} out of range: this model has blocks 0..{n_layer - 1}")
    if override_bytes is not None:
        run.model.config.require_kron()
    fwd = _forward_fn(run.model, tuple(layers))
    t = max(len(s) for s in seqs)
    b = min(chunk, len(seqs))
    pos_dim = run.model.config.pos_dim
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, len(seqs), b):
        part = list(seqs[start:start + b])
        n = len(part)
        ids = np.zeros((b, t), np.int32)
        last = np.zeros((b,), np.int32)
        for i, s in enumerate(part):
            ids[i, :len(s)] = s
            last[i] = len(s) - 1
        override = None
        if override_bytes is not None:
            rows = np.zeros((b, t, pos_dim), np.uint8)
            lengths = np.zeros((b, t), np.int32)
            mask = np.zeros((b, t), bool)
            for i, ob in enumerate(override_bytes[start:start + n]):
                if ob is not None:
                    r, ln = encode_bytes([ob[1]], pos_dim)
                    rows[i, ob[0]], lengths[i, ob[0]], mask[i, ob[0]] = r[0], ln[0], True
            override = ByteOverride(rows, lengths, mask)
        res = jax.device_get(fwd(run.params, ids, last, override))
        parts.append({k: np.asarray(v)[:n] for k, v in res.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def log_softmax(logits_NxV: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = np.asarray(logits_NxV, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def cosine_rows(a_NxD: np.ndarray, b_NxD: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows (0 where a row is all zeros)."""
    a = np.asarray(a_NxD, np.float64)
    b = np.asarray(b_NxD, np.float64)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1.0), 0.0)


def prepare_out(out: str | Path | None, names: Iterable[str], force: bool) -> Any:
    """The output directory (a local Path or a gs:// one), refusing to replace earlier
    results unless force is given."""
    if out is None:
        return None
    out = storage.as_path(out)
    existing = [n for n in names if (out / n).exists()]
    if existing and not force:
        raise FileExistsError(f"{out} already holds {existing}: pass --force to replace them, "
                              f"or choose another --out")
    if isinstance(out, Path):
        out.mkdir(parents=True, exist_ok=True)
    return out


def write_text(path: Any, text: str) -> None:
    """A result file, written whole (local or in a bucket)."""
    storage.write_bytes(path, text.encode("utf-8"))


def write_json(path: Any, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"cannot write {type(x).__name__} as JSON")


def fmt(x: Any, digits: int = 3) -> str:
    """A table cell: floats to `digits` places, None and NaN as '-'."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if x != 0 and abs(x) < 0.5 * 10 ** -digits:
            return f"{x:.{max(digits - 1, 1)}e}"  # small but not zero: keep it visible
        return f"{x:.{digits}f}"
    return str(x)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; '|' in cells is escaped."""
    def cell(x: Any) -> str:
        return fmt(x).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def mean(values: Iterable[float]) -> float | None:
    vals = [float(v) for v in values]
    return float(np.mean(vals)) if vals else None


def group_by(records: Iterable[Mapping[str, Any]], *keys: str) -> dict[tuple, list[Mapping]]:
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups
