"""The Kronecker codec: byte rows -> z-normalised codec vectors, three exact ways.

For a token with bytes b_0..b_{L-1} (L <= P = pos_dim), D = 256 * P:

    x = (1/sqrt(L)) * sum_p onehot(b_p * P + p)          (R^D)
    z = (x - mean(x)) / (std(x, ddof=1) + eps)            (eps = 1e-6, on the std)
    e = z @ W                                             (W: D x F)

x has exactly L equal non-zeros at distinct indices, so mean and std depend on L only and

    e = (s * sum_p W[b_p * P + p] - mu * colsum(W)) / (sigma + eps)

with s = 1/sqrt(L), mu = L*s/D, sigma = sqrt((L*s^2 - D*mu^2)/(D-1)). L = 0 gives e = 0.

Three implementations, all exact against the authors' PyTorch package:
- `reference_codec`: the NumPy formula (float64 inside), the independent oracle for tests.
- `codec_vectors`: the dense on-the-fly computation in JAX (the paper's runtime variant).
- `closed_form`: L row gathers and one shared column sum; no V x D table, no N x D intermediate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CHAR_DIM = 256
EPS = 1e-6


def codec_dim(pos_dim: int) -> int:
    """D = 256 * pos_dim: the width of a codec vector and the row count of W."""
    return CHAR_DIM * pos_dim


def _check_rows(rows_NxP: np.ndarray, lengths_N: np.ndarray) -> None:
    if rows_NxP.ndim != 2:
        raise ValueError(f"byte rows must be (N, pos_dim); got shape {rows_NxP.shape}")
    if lengths_N.shape != rows_NxP.shape[:1]:
        raise ValueError(
            f"lengths must be (N,) = ({rows_NxP.shape[0]},); got shape {lengths_N.shape}")
    pos_dim = rows_NxP.shape[1]
    if lengths_N.size and (lengths_N.min() < 0 or lengths_N.max() > pos_dim):
        raise ValueError(f"lengths must lie in [0, {pos_dim}]; got "
                         f"[{lengths_N.min()}, {lengths_N.max()}]")


def reference_codec(rows_NxP: np.ndarray, lengths_N: np.ndarray, eps: float = EPS) -> np.ndarray:
    """The NumPy formula, term by term (dense x, then z-norm with ddof=1): the test oracle."""
    rows_NxP = np.asarray(rows_NxP)
    lengths_N = np.asarray(lengths_N)
    _check_rows(rows_NxP, lengths_N)
    n, pos_dim = rows_NxP.shape
    d = codec_dim(pos_dim)
    x_NxD = np.zeros((n, d), np.float64)
    for i in range(n):
        length = int(lengths_N[i])
        for p in range(length):
            x_NxD[i, int(rows_NxP[i, p]) * pos_dim + p] += 1.0 / np.sqrt(length)
    mean = x_NxD.mean(axis=1, keepdims=True)
    std = x_NxD.std(axis=1, ddof=1, keepdims=True)
    return ((x_NxD - mean) / (std + eps)).astype(np.float32)


def flat_indices(rows_NxP: jax.Array) -> jax.Array:
    """Index of each (byte, position) pair in the flattened (256, P) codec space."""
    pos_dim = rows_NxP.shape[-1]
    return rows_NxP.astype(jnp.int32) * pos_dim + jnp.arange(pos_dim, dtype=jnp.int32)


def length_stats(lengths: jax.Array, pos_dim: int, eps: float = EPS
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(s, mu, 1/(sigma+eps)) per token, float32, from the length alone.

    Computed in float64-equivalent closed algebra: var = (1 - L/D)/(D-1) for L > 0, which
    avoids the cancellation of L*s^2 - D*mu^2. L = 0 gives (0, 0, 1/eps) and so z = 0.
    """
    d = float(codec_dim(pos_dim))
    length_f = lengths.astype(jnp.float32)
    nonzero = lengths > 0
    safe_len = jnp.where(nonzero, length_f, 1.0)
    s = jnp.where(nonzero, jax.lax.rsqrt(safe_len), 0.0)
    mu = jnp.where(nonzero, jnp.sqrt(safe_len) / d, 0.0)
    sigma = jnp.where(nonzero, jnp.sqrt((1.0 - safe_len / d) / (d - 1.0)), 0.0)
    return s, mu, 1.0 / (sigma + eps)


def codec_vectors(rows_NxP: jax.Array, lengths_N: jax.Array, eps: float = EPS) -> jax.Array:
    """Dense z-normed codec vectors (N, D) in float32, computed numerically from the bytes.

    This is the paper's on-the-fly variant: build x by one-hot scatter, then take the mean
    and the Bessel-corrected std of each row. It materialises N x D; use it for reference
    and small batches, and `closed_form` for training.
    """
    n, pos_dim = rows_NxP.shape
    d = codec_dim(pos_dim)
    valid_NxP = jnp.arange(pos_dim) < lengths_N[:, None]
    s_N, _, _ = length_stats(lengths_N, pos_dim, eps)
    vals_NxP = jnp.where(valid_NxP, s_N[:, None], 0.0).astype(jnp.float32)
    x_NxD = jnp.zeros((n, d), jnp.float32)
    x_NxD = x_NxD.at[jnp.arange(n)[:, None], flat_indices(rows_NxP)].add(vals_NxP)
    mean = x_NxD.mean(axis=-1, keepdims=True)
    centred = x_NxD - mean
    std = jnp.sqrt(jnp.sum(centred * centred, axis=-1, keepdims=True) / (d - 1))
    return centred / (std + eps)


def codec_table(rows_VxP: np.ndarray, lengths_V: np.ndarray, eps: float = EPS,
                chunk: int = 4096) -> np.ndarray:
    """The (V, D) float32 constant table, built in chunks (V x D can be gigabytes)."""
    rows_VxP = np.asarray(rows_VxP)
    lengths_V = np.asarray(lengths_V)
    _check_rows(rows_VxP, lengths_V)
    fn = jax.jit(lambda r, l: codec_vectors(r, l, eps))
    parts = [np.asarray(fn(rows_VxP[i:i + chunk], lengths_V[i:i + chunk]))
             for i in range(0, rows_VxP.shape[0], chunk)]
    if not parts:
        return np.zeros((0, codec_dim(rows_VxP.shape[1])), np.float32)
    return np.concatenate(parts, axis=0)


def gather_sum(w_DxF: jax.Array, rows_NxP: jax.Array, lengths_N: jax.Array) -> jax.Array:
    """sum_{p < L} W[b_p * P + p] for each token: the only per-token work of the closed form.

    W is viewed as (256, P, F); position p reads its own (256, F) slab, so the P gathers
    are unrolled into one fused loop with no (N, P, F) intermediate.
    """
    pos_dim = rows_NxP.shape[-1]
    d, f = w_DxF.shape
    if d != codec_dim(pos_dim):
        raise ValueError(f"projection has {d} rows; pos_dim={pos_dim} needs {codec_dim(pos_dim)}")
    w_CxPxF = w_DxF.reshape(CHAR_DIM, pos_dim, f)
    idx_NxP = rows_NxP.astype(jnp.int32)
    acc_NxF = jnp.zeros(rows_NxP.shape[:1] + (f,), w_DxF.dtype)
    for p in range(pos_dim):
        row_NxF = jnp.take(w_CxPxF[:, p, :], idx_NxP[:, p], axis=0)
        acc_NxF = acc_NxF + jnp.where((lengths_N > p)[:, None], row_NxF, 0)
    return acc_NxF


def closed_form(w_DxF: jax.Array, rows_NxP: jax.Array, lengths_N: jax.Array,
                eps: float = EPS) -> jax.Array:
    """e = (s * sum_p W[idx_p] - mu * colsum(W)) / (sigma + eps), float32 accumulate."""
    pos_dim = rows_NxP.shape[-1]
    s_N, mu_N, inv_N = length_stats(lengths_N, pos_dim, eps)
    w32 = w_DxF.astype(jnp.float32)
    colsum_F = jnp.sum(w32, axis=0)
    summed_NxF = gather_sum(w32, rows_NxP, lengths_N)
    return (s_N[:, None] * summed_NxF - mu_N[:, None] * colsum_F) * inv_N[:, None]
