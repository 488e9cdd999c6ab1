"""The Kronecker codec: byte rows -> z-normalised codec vectors, three exact ways.

For a token with bytes b_0..b_{L-1} (L <= P = pos_dim), C = 256 * P:

    x = (1/sqrt(L)) * sum_p onehot(b_p * P + p)          (R^C)
    z = (x - mean(x)) / (std(x, ddof=1) + eps)            (eps = 1e-6, on the std)
    e = z @ W                                             (W: C x D)

x has exactly L equal non-zeros at distinct indices, so mean and std depend on L only and

    e = (s * sum_p W[b_p * P + p] - mu * colsum(W)) / (sigma + eps)

with s = 1/sqrt(L), mu = L*s/C, sigma = sqrt((L*s^2 - C*mu^2)/(C-1)). L = 0 gives e = 0.

Three implementations, all exact against the authors' PyTorch package:
- `reference_codec`: the NumPy formula (float64 inside), the independent oracle for tests.
- `codec_vectors`: the dense on-the-fly computation in JAX (the paper's runtime variant).
- `closed_form`: L row gathers and one shared column sum; no V x C table, no N x C intermediate.
  Blocked loops with a hand-written VJP (scatter-add into W's (256, P, D) slabs), so that
  on CPU its forward+backward beats `nn.Embed`'s (whose gradient is a dense V x D); on GPUs
  all tokens form one block (no sequential loop: XLA fuses the gathers there); on TPUs both
  directions are one matmul with the bytes' one-hot (the MXU instead of P gathers).
"""

from __future__ import annotations

import functools
from typing import Any

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
    x_NxC = np.zeros((n, d), np.float64)
    for i in range(n):
        length = int(lengths_N[i])
        for p in range(length):
            x_NxC[i, int(rows_NxP[i, p]) * pos_dim + p] += 1.0 / np.sqrt(length)
    mean = x_NxC.mean(axis=1, keepdims=True)
    std = x_NxC.std(axis=1, ddof=1, keepdims=True)
    return ((x_NxC - mean) / (std + eps)).astype(np.float32)


def flat_indices(rows_NxP: jax.Array) -> jax.Array:
    """Index of each (byte, position) pair in the flattened (256, P) codec space."""
    pos_dim = rows_NxP.shape[-1]
    return rows_NxP.astype(jnp.int32) * pos_dim + jnp.arange(pos_dim, dtype=jnp.int32)


def length_stats(lengths: jax.Array, pos_dim: int, eps: float = EPS
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(s, mu, 1/(sigma+eps)) per token, float32, from the length alone.

    Computed in float64-equivalent closed algebra: var = (1 - L/C)/(C-1) for L > 0, which
    avoids the cancellation of L*s^2 - C*mu^2. L = 0 gives (0, 0, 1/eps) and so z = 0.
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
    """Dense z-normed codec vectors (N, C) in float32, computed numerically from the bytes.

    This is the paper's on-the-fly variant: build x by one-hot scatter, then take the mean
    and the Bessel-corrected std of each row. It materialises N x C; use it for reference
    and small batches, and `closed_form` for training.
    """
    n, pos_dim = rows_NxP.shape
    d = codec_dim(pos_dim)
    valid_NxP = jnp.arange(pos_dim) < lengths_N[:, None]
    s_N, _, _ = length_stats(lengths_N, pos_dim, eps)
    vals_NxP = jnp.where(valid_NxP, s_N[:, None], 0.0).astype(jnp.float32)
    x_NxC = jnp.zeros((n, d), jnp.float32)
    x_NxC = x_NxC.at[jnp.arange(n)[:, None], flat_indices(rows_NxP)].add(vals_NxP)
    mean = x_NxC.mean(axis=-1, keepdims=True)
    centred = x_NxC - mean
    std = jnp.sqrt(jnp.sum(centred * centred, axis=-1, keepdims=True) / (d - 1))
    return centred / (std + eps)


def codec_table(rows_VxP: np.ndarray, lengths_V: np.ndarray, eps: float = EPS,
                chunk: int = 4096) -> np.ndarray:
    """The (V, C) float32 constant table, built in chunks (V x C can be gigabytes)."""
    rows_VxP = np.asarray(rows_VxP)
    lengths_V = np.asarray(lengths_V)
    _check_rows(rows_VxP, lengths_V)
    fn = jax.jit(lambda r, l: codec_vectors(r, l, eps))
    parts = [np.asarray(fn(rows_VxP[i:i + chunk], lengths_V[i:i + chunk]))
             for i in range(0, rows_VxP.shape[0], chunk)]
    if not parts:
        return np.zeros((0, codec_dim(rows_VxP.shape[1])), np.float32)
    return np.concatenate(parts, axis=0)


_BLOCK = 128  # tokens per block of the fused loops on CPU (a 128 x D block stays in L2);
#              block sizes measured: docs/performance.md. None: all tokens in one block.
_ACCELERATOR_BLOCK: int | None = None  # GPU/TPU: one block, i.e. no sequential loop: XLA
#              fuses the P gathers into one kernel there, and a loop of small blocks would
#              cost a few kernel launches per block.


def _check_projection(w_CxD: jax.Array, pos_dim: int) -> None:
    d = w_CxD.shape[0]
    if d != codec_dim(pos_dim):
        raise ValueError(f"projection has {d} rows; pos_dim={pos_dim} needs {codec_dim(pos_dim)}")


def _coefficients(lengths_N: jax.Array, pos_dim: int, eps: float, normalise: bool
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(s, mu, 1/(sigma+eps)) for the closed form; (1, 0, 1) for a plain gather-sum."""
    if normalise:
        return length_stats(lengths_N, pos_dim, eps)
    ones = jnp.ones(lengths_N.shape, jnp.float32)
    return ones, jnp.zeros_like(ones), ones


def _blocks(n: int, block: int | None) -> tuple[int, int]:
    """(block size, number of blocks) covering n tokens; the last block may be padding."""
    block = max(1, n if block is None else min(block, n))
    return block, -(-n // block)


def _pad_tokens(x: jax.Array, total: int) -> jax.Array:
    """Pad the token axis to `total` with zeros (length 0: the token embeds to 0)."""
    extra = total - x.shape[0]
    return x if extra == 0 else jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1))


class _Tokens:
    """Where each block of tokens gets its byte rows, lengths and validity from.

    Either per-token arrays (rows (N, P), lengths (N,)), or per-vocabulary tables (rows
    (V, P), lengths (V,)) plus ids (N,): then each block gathers its own rows inside the
    loop, so no (N, P) array exists, and ids outside [0, V) are invalid (embed to NaN).
    valid (N,) bool, optional, marks more tokens invalid.
    """

    def __init__(self, rows: jax.Array, lengths: jax.Array, ids: jax.Array | None,
                 valid: jax.Array | None, block: int | None):
        self.pos_dim = rows.shape[-1]
        self.n = rows.shape[0] if ids is None else ids.shape[0]
        self.block, n_blocks = _blocks(self.n, block)
        self.total = self.block * n_blocks
        self.n_blocks = n_blocks if self.n else 0
        self.ids = None if ids is None else _pad_tokens(ids.astype(jnp.int32), self.total)
        if ids is None:
            rows, lengths = _pad_tokens(rows, self.total), _pad_tokens(lengths, self.total)
        self.rows, self.lengths = rows, lengths.astype(jnp.int32)
        self.valid = None if valid is None else _pad_tokens(valid.astype(bool), self.total)

    def block_at(self, start: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """(rows (M, P) int32, lengths (M,) int32, valid (M,) bool or None) of one block."""
        take = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=start,
                                 slice_size=self.block)
        valid = None if self.valid is None else take(self.valid)
        if self.ids is None:
            return take(self.rows).astype(jnp.int32), take(self.lengths), valid
        ids = take(self.ids)
        in_range = (ids >= 0) & (ids < self.rows.shape[0])
        valid = in_range if valid is None else valid & in_range
        safe = jnp.where(in_range, ids, 0)
        return (self.rows.at[safe].get(mode="promise_in_bounds").astype(jnp.int32),
                self.lengths.at[safe].get(mode="promise_in_bounds"), valid)


def _project_fwd_impl(w_CxD: jax.Array, tokens: _Tokens, eps: float,
                      normalise: bool) -> jax.Array:
    """(s * sum_{p<L} W[b_p*P+p] - mu * colsum(W)) * inv, one block of tokens at a time.

    W is read as (256, P, D): position p gathers from its own (256, D) slab. Per block, the
    P gathers, the length mask, the s/mu/sigma terms and the validity (NaN) mask are one
    fused loop that writes the block's output rows once: nothing of shape (N, P, D) or
    (N, C) exists. (Unblocked, the same expression is left unfused by XLA's CPU heuristics
    in some contexts, materialising P gathers of (N, D); the scan makes the fusion reliable.)
    """
    pos_dim, f = tokens.pos_dim, w_CxD.shape[1]
    if tokens.n == 0:
        return jnp.zeros((0, f), w_CxD.dtype)
    w_256xPxD = w_CxD.reshape(CHAR_DIM, pos_dim, f)
    colsum_D = jnp.sum(w_CxD, axis=0) if normalise else None

    def one_block(i: jax.Array) -> jax.Array:
        r_MxP, l_M, v_M = tokens.block_at(i * tokens.block)
        acc_MxD = jnp.zeros((tokens.block, f), w_CxD.dtype)
        for p in range(pos_dim):
            row_MxD = w_256xPxD.at[r_MxP[:, p], p].get(mode="promise_in_bounds")
            acc_MxD = acc_MxD + jnp.where((l_M > p)[:, None], row_MxD, 0)
        if normalise:
            s_M, mu_M, inv_M = length_stats(l_M, pos_dim, eps)
            acc_MxD = (s_M[:, None] * acc_MxD - mu_M[:, None] * colsum_D) * inv_M[:, None]
        if v_M is not None:
            acc_MxD = jnp.where(v_M[:, None], acc_MxD, jnp.nan)
        return acc_MxD.astype(w_CxD.dtype)

    _, out = jax.lax.scan(lambda c, i: (c, one_block(i)), None, jnp.arange(tokens.n_blocks))
    out = out.reshape(tokens.total, f)
    return out if tokens.total == tokens.n else out[:tokens.n]


def _project_bwd_impl(ct_NxD: jax.Array, tokens: _Tokens, eps: float,
                      normalise: bool) -> jax.Array:
    """The exact transpose of `_project_fwd_impl`, with no (N, P, D) or (N, C) either.

    dW[b*P+p] += s*inv*ct for each valid (token, p), and every row of dW gets -sum(mu*inv*ct).
    A first pass over the blocks sums that shared term, which seeds the accumulator, so the
    second scan's carry is the gradient itself (no second C x D buffer, no N-sized temporary);
    it scatter-adds each block of tokens into the (256, D) slab of each position (invalid
    positions index past the slab and are dropped). The slabs stay in cache and the cotangent
    is read in order. Invalid tokens (NaN outputs) contribute nothing, as under autodiff of
    a `where` (save that a non-finite cotangent at one would reach the shared term as 0*inf).
    """
    pos_dim, f = tokens.pos_dim, ct_NxD.shape[1]
    if tokens.n == 0:
        return jnp.zeros((codec_dim(pos_dim), f), jnp.float32)
    ct = _pad_tokens(ct_NxD.astype(jnp.float32), tokens.total)

    def shared_block(acc_D: jax.Array, i: jax.Array):
        start = i * tokens.block
        _, l_M, v_M = tokens.block_at(start)
        _, mu_M, inv_M = length_stats(l_M, pos_dim, eps)
        m_M = mu_M * inv_M if v_M is None else jnp.where(v_M, mu_M * inv_M, 0.0)
        ct_MxD = jax.lax.dynamic_slice_in_dim(ct, start, tokens.block)
        return acc_D + jnp.sum(m_M[:, None] * ct_MxD, axis=0), None

    if normalise:
        shared_D, _ = jax.lax.scan(shared_block, jnp.zeros((f,), jnp.float32),
                                   jnp.arange(tokens.n_blocks))
        init = jnp.broadcast_to(-shared_D, (CHAR_DIM, pos_dim, f))
    else:
        init = jnp.zeros((CHAR_DIM, pos_dim, f), jnp.float32)

    def one_block(dw_256xPxD: jax.Array, i: jax.Array):
        start = i * tokens.block
        r_MxP, l_M, v_M = tokens.block_at(start)
        s_M, _, inv_M = _coefficients(l_M, pos_dim, eps, normalise)
        h_MxD = (s_M * inv_M)[:, None] * jax.lax.dynamic_slice_in_dim(ct, start, tokens.block)
        if v_M is not None:
            h_MxD = jnp.where(v_M[:, None], h_MxD, 0.0)
        valid_MxP = jnp.arange(pos_dim, dtype=jnp.int32) < l_M[:, None]
        r_MxP = jnp.where(valid_MxP, r_MxP, CHAR_DIM)  # past the slab: dropped
        for p in range(pos_dim):
            dw_256xPxD = dw_256xPxD.at[r_MxP[:, p], p].add(h_MxD, mode="drop")
        return dw_256xPxD, None

    dw_256xPxD, _ = jax.lax.scan(one_block, init, jnp.arange(tokens.n_blocks))
    return dw_256xPxD.reshape(codec_dim(pos_dim), f)


def _onehot_MxC(r_MxP: jax.Array, l_M: jax.Array) -> jax.Array:
    """x of the module docstring before scaling: token m's row of the codec, 1 at column
    b_p * P + p for each p < L, as a (M, C) float32 operand (C in W's own row order, so the
    product is a plain 2-D matmul, partitioned like any other over W's sharded rows)."""
    m, pos_dim = r_MxP.shape
    r_Mx256xP = jnp.broadcast_to(r_MxP[:, None, :], (m, CHAR_DIM, pos_dim))
    byte_1x256x1 = jnp.arange(CHAR_DIM, dtype=jnp.int32)[None, :, None]
    valid_Mx1xP = (jnp.arange(pos_dim, dtype=jnp.int32) < l_M[:, None])[:, None, :]
    return ((r_Mx256xP == byte_1x256x1) & valid_Mx1xP).astype(jnp.float32).reshape(
        m, CHAR_DIM * pos_dim)


def _project_fwd_mxu(w_CxD: jax.Array, tokens: _Tokens, eps: float, normalise: bool
                     ) -> jax.Array:
    """`_project_fwd_impl` as one matmul of the tokens' one-hot codec rows with W (the MXU).

    XLA:TPU's cost model charges a gathered row about eight times its bytes, so P gathers
    per token cost 16-20x the table arm's one (docs/scaling.md); the one-hot product reads
    W and writes the output once, for 2 * P * 256 * D flops per token. Precision HIGHEST:
    float32 sums, as the other variants (one-hot entries are exact in any precision).
    """
    f = w_CxD.shape[1]
    if tokens.n == 0:
        return jnp.zeros((0, f), w_CxD.dtype)
    r_MxP, l_M, v_M = tokens.block_at(0)
    acc_MxD = jnp.dot(_onehot_MxC(r_MxP, l_M), w_CxD.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
    if normalise:
        s_M, mu_M, inv_M = length_stats(l_M, tokens.pos_dim, eps)
        acc_MxD = (s_M[:, None] * acc_MxD - mu_M[:, None] * jnp.sum(w_CxD, axis=0)
                   ) * inv_M[:, None]
    if v_M is not None:
        acc_MxD = jnp.where(v_M[:, None], acc_MxD, jnp.nan)
    return acc_MxD[:tokens.n].astype(w_CxD.dtype)


def _project_bwd_mxu(ct_NxD: jax.Array, tokens: _Tokens, eps: float, normalise: bool
                     ) -> jax.Array:
    """The transpose of `_project_fwd_mxu`: dW = onehot^T (s * inv * ct) - shared term."""
    pos_dim, f = tokens.pos_dim, ct_NxD.shape[1]
    if tokens.n == 0:
        return jnp.zeros((codec_dim(pos_dim), f), jnp.float32)
    r_MxP, l_M, v_M = tokens.block_at(0)
    ct_MxD = _pad_tokens(ct_NxD.astype(jnp.float32), tokens.total)
    s_M, mu_M, inv_M = _coefficients(l_M, pos_dim, eps, normalise)
    h_MxD = (s_M * inv_M)[:, None] * ct_MxD
    if v_M is not None:
        h_MxD = jnp.where(v_M[:, None], h_MxD, 0.0)
    dw_CxD = jnp.dot(_onehot_MxC(r_MxP, l_M).T, h_MxD, precision=jax.lax.Precision.HIGHEST)
    if normalise:
        m_M = mu_M * inv_M if v_M is None else jnp.where(v_M, mu_M * inv_M, 0.0)
        dw_CxD = dw_CxD - jnp.sum(m_M[:, None] * ct_MxD, axis=0)
    return dw_CxD


def _per_platform(blocked: Any, mxu: Any) -> jax.Array:
    """blocked(block) with the CPU block size on CPU and _ACCELERATOR_BLOCK on GPUs;
    mxu(None), the one-hot matmul formulation, on TPUs.

    `lax.platform_dependent`, not the default backend, picks: a step compiled ahead of time
    for another platform (a TPU dry run on a CPU host) gets that platform's variant. Every
    variant computes each token's output from the same terms (the compiled code may round
    them differently, by an ulp); the backward's sums are merely grouped differently.
    """
    return jax.lax.platform_dependent(cpu=lambda: blocked(_BLOCK), tpu=lambda: mxu(None),
                                      default=lambda: blocked(_ACCELERATOR_BLOCK))


def _forward(w_CxD, rows, lengths, ids_N, valid_N, eps, normalise):
    def run(impl: Any) -> Any:
        return lambda block: impl(w_CxD, _Tokens(rows, lengths, ids_N, valid_N, block), eps,
                                  normalise)
    return _per_platform(run(_project_fwd_impl), run(_project_fwd_mxu))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _project(w_CxD: jax.Array, rows: jax.Array, lengths: jax.Array, ids_N: jax.Array | None,
             valid_N: jax.Array | None, eps: float, normalise: bool) -> jax.Array:
    """The closed form (normalise) or the plain gather-sum, with a hand-written VJP in W."""
    return _forward(w_CxD, rows, lengths, ids_N, valid_N, eps, normalise)


def _project_fwd(w_CxD, rows, lengths, ids_N, valid_N, eps, normalise):
    out = _forward(w_CxD, rows, lengths, ids_N, valid_N, eps, normalise)
    # residuals: the integer inputs only (W is not needed: the map is linear in W)
    return out, (rows, lengths, ids_N, valid_N, jnp.zeros((0,), w_CxD.dtype))


def _project_bwd(eps, normalise, res, ct_NxD):
    rows, lengths, ids_N, valid_N, dtype_tag = res
    def run(impl: Any) -> Any:
        return lambda block: impl(ct_NxD, _Tokens(rows, lengths, ids_N, valid_N, block), eps,
                                  normalise)
    dw = _per_platform(run(_project_bwd_impl), run(_project_bwd_mxu))
    return dw.astype(dtype_tag.dtype), None, None, None, None


_project.defvjp(_project_fwd, _project_bwd)


def closed_form(w_CxD: jax.Array, rows_NxP: jax.Array, lengths_N: jax.Array,
                eps: float = EPS, *, valid_N: jax.Array | None = None,
                ids_N: jax.Array | None = None) -> jax.Array:
    """e = (s * sum_p W[idx_p] - mu * colsum(W)) / (sigma + eps), float32 accumulate.

    Forward and backward are fused block loops (`_project_fwd_impl`); the backward is the
    exact transpose, a scatter-add into W's (256, P, D) slabs plus the shared colsum term.
    It is a `jax.custom_vjp`: reverse mode (grad, vjp) works, forward mode (jvp) does not.

    valid_N (optional, bool (N,)): tokens where it is false embed to NaN and get no
    gradient: `jnp.where(valid_N[:, None], e, nan)`, but fused into the loops (a separate
    `where` costs an extra (N, D) pass and buffer in both the forward and the backward).

    ids_N (optional, int (N,)): then rows_NxP and lengths_N are the vocabulary's tables,
    (V, P) and (V,), and token n is id ids_N[n]: each block gathers its own rows inside the
    loop (no (N, P) array), and ids outside [0, V) embed to NaN, as `nn.Embed`'s do.
    """
    w_CxD, rows_NxP, lengths_N = (jnp.asarray(x) for x in (w_CxD, rows_NxP, lengths_N))
    _check_projection(w_CxD, rows_NxP.shape[-1])
    n = rows_NxP.shape[0]
    if ids_N is not None:
        ids_N = jnp.asarray(ids_N)
        if not jnp.issubdtype(ids_N.dtype, jnp.integer) or ids_N.ndim != 1:
            raise TypeError(f"ids_N must be a 1-D integer array; got {ids_N.dtype}{ids_N.shape}")
        n = ids_N.shape[0]
    if valid_N is not None:
        valid_N = jnp.asarray(valid_N, bool).reshape((n,))
    return _project(w_CxD.astype(jnp.float32), rows_NxP, lengths_N, ids_N, valid_N,
                    float(eps), True)
