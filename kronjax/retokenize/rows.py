"""Rows of a new vocabulary's table or head from the source's, as pure NumPy.

Every init keeps the rows of tokens the source has (`TokenMap.exact`); `--init` decides the
rest: fvt (the mean of the source rows of the pieces the source splits the token into: Fast
Vocabulary Transfer, the standard zero-shot init), mean (the mean of all source token rows),
zero. A token nothing segments (an empty special) falls back to the mean. Padding ids (past
the tokenizer, up to model.vocab_multiple) copy the source's padding rows in order, which
training pushed down as never-seen targets; past those, their mean (zeros if it has none).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kronjax.retokenize.mapping import TokenMap

INITS = ("fvt", "mean", "zero")


def fvt_rows(source_VxD: np.ndarray, pieces: Sequence[Sequence[int]],
             fallback_D: np.ndarray) -> np.ndarray:
    """Row i = mean of source_VxD[pieces[i]]; fallback_D where pieces[i] is empty."""
    out = np.empty((len(pieces), source_VxD.shape[1]), source_VxD.dtype)
    for i, ids in enumerate(pieces):
        out[i] = source_VxD[np.asarray(ids, np.int64)].mean(axis=0) if len(ids) else fallback_D
    return out


def token_rows(source_VxD: np.ndarray, n_source: int, tmap: TokenMap, init: str) -> np.ndarray:
    """(V_new_tokens, D): exact rows copied, the others by `init` (module docstring)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}; got {init!r}")
    tokens = np.asarray(source_VxD[:n_source])
    mean_D = tokens.mean(axis=0)
    n = len(tmap.exact)
    out = np.zeros((n, tokens.shape[1]), tokens.dtype)
    has = tmap.exact >= 0
    out[has] = tokens[tmap.exact[has]]
    new = np.flatnonzero(~has)
    if init == "fvt":
        out[new] = fvt_rows(tokens, [tmap.pieces[j] for j in new], mean_D)
    elif init == "mean":
        out[new] = mean_D
    return out


def padded_rows(source_VxD: np.ndarray, n_source: int, rows_NxD: np.ndarray,
                n_padded: int) -> np.ndarray:
    """rows_NxD extended to n_padded rows with padding rows (module docstring)."""
    pad_src = np.asarray(source_VxD[n_source:])
    extra = n_padded - rows_NxD.shape[0]
    if extra < 0:
        raise ValueError(f"{rows_NxD.shape[0]} token rows exceed the padded size {n_padded}")
    fill = pad_src.mean(axis=0) if len(pad_src) else np.zeros(rows_NxD.shape[1], rows_NxD.dtype)
    pad = np.tile(fill.astype(rows_NxD.dtype), (extra, 1))
    k = min(extra, len(pad_src))
    pad[:k] = pad_src[:k]
    return np.concatenate([rows_NxD, pad])


def new_matrix(source_VxD: np.ndarray, n_source: int, tmap: TokenMap, init: str,
               n_padded: int) -> np.ndarray:
    """A new (n_padded, D) table or head (transposed) from the source's."""
    return padded_rows(source_VxD, n_source, token_rows(source_VxD, n_source, tmap, init),
                       n_padded)
