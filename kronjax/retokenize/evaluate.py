"""Bits per UTF-8 byte over a whole held-out split: the measure that compares tokenizers.

Nats per token do not compare across tokenizers (a token holds more or less text); nats per
byte of the text do. The trainer's val_bpb divides a loss over a sample of windows by the
split's mean bytes per token; here every token of the split after the first is predicted once
(consecutive windows of block_size tokens, each target's bytes counted exactly: specials and
end-of-text 0), so two tokenizers are scored on the same text.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from kronjax import data as data_lib
from kronjax.data import cache as data_cache
from kronjax.model import GPT
from kronjax.retokenize.mapping import byte_lengths
from kronjax.run import Loaded


def split_windows(tokens_N: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each (n, block): consecutive windows covering tokens_N[1:] whole,
    the last one shifted back to end at the split's end (its overlap is not scored twice:
    see `target_mask`)."""
    n_pred = len(tokens_N) - 1
    if n_pred < block:
        raise ValueError(f"the split has {len(tokens_N)} tokens: too few for one window of "
                         f"{block}")
    starts = np.arange(0, n_pred - block + 1, block)
    if starts[-1] + block < n_pred:
        starts = np.append(starts, n_pred - block)
    idx = starts[:, None] + np.arange(block)[None, :]
    return tokens_N[idx], tokens_N[idx + 1]


def target_mask(n_tokens: int, block: int, n_windows: int) -> np.ndarray:
    """(n_windows, block) bool: which targets are scored (the last window's overlap is not)."""
    mask = np.ones((n_windows, block), bool)
    covered = (n_windows - 1) * block
    if covered + block > n_tokens - 1:  # the last window was shifted back
        mask[-1, :covered + block - (n_tokens - 1)] = False
    return mask


def nats_per_position(model: GPT, params: Any, inputs: np.ndarray, targets: np.ndarray,
                      batch: int = 16) -> np.ndarray:
    """Cross-entropy of every target (nats), batch windows at a time."""
    @jax.jit
    def fn(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = model.apply({"params": p}, x)
        logz = jax.nn.logsumexp(logits, axis=-1)
        return logz - np.take_along_axis(logits, y[..., None], axis=-1)[..., 0]

    out = []
    for i in range(0, len(inputs), batch):
        x, y = inputs[i:i + batch], targets[i:i + batch]
        pad = batch - len(x)  # one shape for every call: the last batch padded, then cut
        if pad:
            x, y = (np.concatenate([a, np.repeat(a[:1], pad, 0)]) for a in (x, y))
        out.append(np.asarray(fn(params, x.astype(np.int32), y.astype(np.int32)))[:batch - pad])
    return np.concatenate(out)


def held_out_bpb(run: Loaded, split: str = "val", batch: int | None = None,
                 max_bytes: int | None = None) -> dict[str, float]:
    """{bpb, nats, bytes, tokens} of `run` over its whole prepared `split`, or over its
    first max_bytes of text (to the token that reaches it: about the same text under any
    tokenizer, and the bytes counted exactly)."""
    ddir = data_cache.data_dir_for(run.cfg)
    tokens = np.asarray(data_lib.load_split(ddir, split, vocab_size=run.tokenizer.vocab_size))
    if max_bytes is not None:
        reach = np.cumsum(byte_lengths(run.tokenizer)[tokens])
        tokens = tokens[:int(np.searchsorted(reach, max_bytes)) + 1]
    block = run.model.config.block_size
    inputs, targets = split_windows(tokens, block)
    mask = target_mask(len(tokens), block, len(inputs))
    # Fewer windows per call for a big vocabulary: the logits are windows x block x V.
    per_call = batch or max(1, min(16, (1 << 26) // (block * run.model.config.vocab_size)))
    nats = nats_per_position(run.model, run.params, inputs, targets, per_call)
    lengths = byte_lengths(run.tokenizer)
    n_bytes = int(lengths[targets[mask]].sum())
    total = float(nats[mask].astype(np.float64).sum())
    return {"bpb": total / math.log(2) / max(n_bytes, 1), "nats": total, "bytes": n_bytes,
            "tokens": int(mask.sum())}
