"""The closed form's kernels: one formulation per platform, forward and exact transpose.

`kronjax.codec.closed_form` picks among these per platform (`lax.platform_dependent`); each
computes, for tokens with bytes b_p and length L, out = (s * sum_{p<L} W[b_p*P+p] - mu *
colsum(W)) * inv with (s, mu, inv) from `length_stats`, and its transpose in W:

  blocked   P row gathers per token, fused in blocks of tokens by a lax.scan; the backward a
            scatter-add into W's (256, P, D) slabs. CPU (128-token blocks); one block on GPUs
            with GPU codec form "gather-scatter".
  mxu       one matmul of the tokens' one-hot codec rows with W, float32 HIGHEST (TPU).
  sorted    (GPU backward) the (token, position) pairs sorted by their row of W, then one
            scatter-add whose indices are declared sorted: XLA:GPU's sorted-scatter emitter
            sums each run of equal rows in registers and writes it once, so the space byte at
            position 0 of most GPT-2 tokens no longer makes thousands of atomic adds collide
            on one row of W (on jaxlib 0.10.2-0.11.0 a contended f32 atomic add compiles to a
            compare-and-swap loop: jax-ml/jax#38806, openxla/xla#46225).
  onehot16  (GPU) the one-hot matmul on the tensor cores: the one-hot operand is exact in
            bfloat16 and the dense one is split into three bfloat16 parts (hi + mid + lo
            carries float32's 24 bits), summed in float32: float32-exact, no atomics, 3x the
            flops of one bf16 product.

Invalid tokens (ids outside the vocabulary, or valid_N false) embed to NaN and get no
gradient. Everything here is float32 accumulate.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

CHAR_DIM = 256
EPS = 1e-6


def codec_dim(pos_dim: int) -> int:
    """D = 256 * pos_dim: the width of a codec vector and the row count of W."""
    return CHAR_DIM * pos_dim


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


def coefficients(lengths_N: jax.Array, pos_dim: int, eps: float, normalise: bool
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


def pad_tokens(x: jax.Array, total: int) -> jax.Array:
    """Pad the token axis to `total` with zeros (length 0: the token embeds to 0)."""
    extra = total - x.shape[0]
    return x if extra == 0 else jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1))


class Tokens:
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
        self.ids = None if ids is None else pad_tokens(ids.astype(jnp.int32), self.total)
        if ids is None:
            rows, lengths = pad_tokens(rows, self.total), pad_tokens(lengths, self.total)
        self.rows, self.lengths = rows, lengths.astype(jnp.int32)
        self.valid = None if valid is None else pad_tokens(valid.astype(bool), self.total)

    def block_at(self, start: jax.Array | int) -> tuple[jax.Array, jax.Array, jax.Array | None]:
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


# -- blocked gathers and scatter-adds (CPU; GPU form "gather-*" forward) ----------------------
def fwd_blocked(w_CxD: jax.Array, tokens: Tokens, eps: float, normalise: bool) -> jax.Array:
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


def bwd_blocked(ct_NxD: jax.Array, tokens: Tokens, eps: float, normalise: bool) -> jax.Array:
    """The exact transpose of `fwd_blocked`, with no (N, P, D) or (N, C) either.

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
    ct = pad_tokens(ct_NxD.astype(jnp.float32), tokens.total)

    def shared_block(acc_D: jax.Array, i: jax.Array):
        start = i * tokens.block
        _, l_M, v_M = tokens.block_at(start)
        ct_MxD = jax.lax.dynamic_slice_in_dim(ct, start, tokens.block)
        return acc_D + _shared_term(ct_MxD, l_M, v_M, pos_dim, eps), None

    if normalise:
        shared_D, _ = jax.lax.scan(shared_block, jnp.zeros((f,), jnp.float32),
                                   jnp.arange(tokens.n_blocks))
        init = jnp.broadcast_to(-shared_D, (CHAR_DIM, pos_dim, f))
    else:
        init = jnp.zeros((CHAR_DIM, pos_dim, f), jnp.float32)

    def one_block(dw_256xPxD: jax.Array, i: jax.Array):
        start = i * tokens.block
        r_MxP, l_M, v_M = tokens.block_at(start)
        h_MxD = _scaled_cotangent(jax.lax.dynamic_slice_in_dim(ct, start, tokens.block), l_M,
                                  v_M, pos_dim, eps, normalise)
        r_MxP = jnp.where(_valid_positions(l_M, pos_dim), r_MxP, CHAR_DIM)  # past the slab
        for p in range(pos_dim):
            dw_256xPxD = dw_256xPxD.at[r_MxP[:, p], p].add(h_MxD, mode="drop")
        return dw_256xPxD, None

    dw_256xPxD, _ = jax.lax.scan(one_block, init, jnp.arange(tokens.n_blocks))
    return dw_256xPxD.reshape(codec_dim(pos_dim), f)


def _valid_positions(l_M: jax.Array, pos_dim: int) -> jax.Array:
    """(M, P) bool: position p < L of each token."""
    return jnp.arange(pos_dim, dtype=jnp.int32) < l_M[:, None]


def _shared_term(ct_MxD: jax.Array, l_M: jax.Array, v_M: jax.Array | None, pos_dim: int,
                 eps: float) -> jax.Array:
    """sum over valid tokens of mu * inv * ct: what every row of dW loses (D,)."""
    _, mu_M, inv_M = length_stats(l_M, pos_dim, eps)
    m_M = mu_M * inv_M if v_M is None else jnp.where(v_M, mu_M * inv_M, 0.0)
    return jnp.sum(m_M[:, None] * ct_MxD, axis=0)


def _scaled_cotangent(ct_MxD: jax.Array, l_M: jax.Array, v_M: jax.Array | None, pos_dim: int,
                      eps: float, normalise: bool) -> jax.Array:
    """h = s * inv * ct, zero at invalid tokens (whose cotangent may be NaN)."""
    s_M, _, inv_M = coefficients(l_M, pos_dim, eps, normalise)
    h_MxD = (s_M * inv_M)[:, None] * ct_MxD
    return h_MxD if v_M is None else jnp.where(v_M[:, None], h_MxD, 0.0)


# -- one-hot matmuls (TPU: float32 HIGHEST; GPU: three bfloat16 products) ---------------------
Dot = Callable[[jax.Array, jax.Array, bool], jax.Array]


def _onehot_MxC(r_MxP: jax.Array, l_M: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """x of the module docstring before scaling: token m's row of the codec, 1 at column
    b_p * P + p for each p < L, as a (M, C) operand (C in W's own row order, so the
    product is a plain 2-D matmul, partitioned like any other over W's sharded rows)."""
    m, pos_dim = r_MxP.shape
    r_Mx256xP = jnp.broadcast_to(r_MxP[:, None, :], (m, CHAR_DIM, pos_dim))
    byte_1x256x1 = jnp.arange(CHAR_DIM, dtype=jnp.int32)[None, :, None]
    valid_Mx1xP = _valid_positions(l_M, pos_dim)[:, None, :]
    return ((r_Mx256xP == byte_1x256x1) & valid_Mx1xP).astype(dtype).reshape(
        m, CHAR_DIM * pos_dim)


def dot_highest(onehot: jax.Array, dense: jax.Array, transpose: bool) -> jax.Array:
    """onehot @ dense (or onehot^T @ dense), float32 at HIGHEST precision (the TPU's MXU)."""
    lhs = onehot.T if transpose else onehot
    return jnp.dot(lhs.astype(jnp.float32), dense, precision=jax.lax.Precision.HIGHEST)


def split_bf16(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x (float32) as hi + mid + lo, each bfloat16: 3 x 8 bits carry float32's 24-bit
    significand, so the sum restores x up to float32 rounding (bfloat16 has float32's
    exponent range: no part overflows)."""
    hi = x.astype(jnp.bfloat16)
    rest = x - hi.astype(jnp.float32)
    mid = rest.astype(jnp.bfloat16)
    lo = (rest - mid.astype(jnp.float32)).astype(jnp.bfloat16)
    return hi, mid, lo


def dot_bf16x3(onehot: jax.Array, dense: jax.Array, transpose: bool) -> jax.Array:
    """onehot @ dense (or onehot^T @ dense) as one bfloat16 matmul with float32 accumulate.

    The one-hot is exact in bfloat16; the dense operand's three parts sit side by side
    (K, 3D), so one tensor-core product gives all three, summed afterwards in float32."""
    f = dense.shape[-1]
    parts = jnp.concatenate(split_bf16(dense.astype(jnp.float32)), axis=-1)
    contract = ((0,), (0,)) if transpose else ((1,), (0,))
    out = jax.lax.dot_general(onehot.astype(jnp.bfloat16), parts, (contract, ((), ())),
                              preferred_element_type=jnp.float32)
    return (out[:, :f] + out[:, f:2 * f]) + out[:, 2 * f:]


def fwd_onehot(w_CxD: jax.Array, tokens: Tokens, eps: float, normalise: bool,
               dot: Dot = dot_highest) -> jax.Array:
    """`fwd_blocked` as one matmul of the tokens' one-hot codec rows with W.

    XLA:TPU's cost model charges a gathered row about eight times its bytes, so P gathers
    per token cost 16-20x the table arm's one (docs/scaling.md); the one-hot product reads
    W and writes the output once, for 2 * P * 256 * D flops per token. `dot` sets the
    precision: float32 sums either way (one-hot entries are exact in any precision).
    """
    f = w_CxD.shape[1]
    if tokens.n == 0:
        return jnp.zeros((0, f), w_CxD.dtype)
    r_MxP, l_M, v_M = tokens.block_at(0)
    onehot_dtype = jnp.bfloat16 if dot is dot_bf16x3 else jnp.float32
    acc_MxD = dot(_onehot_MxC(r_MxP, l_M, onehot_dtype), w_CxD.astype(jnp.float32), False)
    if normalise:
        s_M, mu_M, inv_M = length_stats(l_M, tokens.pos_dim, eps)
        acc_MxD = (s_M[:, None] * acc_MxD - mu_M[:, None] * jnp.sum(w_CxD, axis=0)
                   ) * inv_M[:, None]
    if v_M is not None:
        acc_MxD = jnp.where(v_M[:, None], acc_MxD, jnp.nan)
    return acc_MxD[:tokens.n].astype(w_CxD.dtype)


def bwd_onehot(ct_NxD: jax.Array, tokens: Tokens, eps: float, normalise: bool,
               dot: Dot = dot_highest) -> jax.Array:
    """The transpose of `fwd_onehot`: dW = onehot^T (s * inv * ct) - shared term."""
    pos_dim, f = tokens.pos_dim, ct_NxD.shape[1]
    if tokens.n == 0:
        return jnp.zeros((codec_dim(pos_dim), f), jnp.float32)
    r_MxP, l_M, v_M = tokens.block_at(0)
    ct_MxD = pad_tokens(ct_NxD.astype(jnp.float32), tokens.total)
    h_MxD = _scaled_cotangent(ct_MxD, l_M, v_M, pos_dim, eps, normalise)
    onehot_dtype = jnp.bfloat16 if dot is dot_bf16x3 else jnp.float32
    dw_CxD = dot(_onehot_MxC(r_MxP, l_M, onehot_dtype), h_MxD, True)
    if normalise:
        dw_CxD = dw_CxD - _shared_term(ct_MxD, l_M, v_M, pos_dim, eps)
    return dw_CxD


# -- sort + sorted segment sum (GPU backward) --------------------------------------------------
def bwd_sorted(ct_NxD: jax.Array, tokens: Tokens, eps: float, normalise: bool) -> jax.Array:
    """The transpose of `fwd_blocked` (one block) by sorting, with no contended atomics.

    Each valid (token, position) pair adds h = s*inv*ct of its token to row b_p*P+p of dW.
    The N*P pairs are sorted by that row (invalid pairs get row C, past the end, and are
    dropped), and the sums are one scatter-add over the rows in sorted order with
    indices_are_sorted: XLA:GPU's sorted-scatter emitter gives each warp a run of
    consecutive pairs, adds equal rows in registers and writes each run once. The sort is a
    (key, value) radix sort of N*P int32 pairs; h is gathered per pair inside the scatter's
    fusion. The same sums as `bwd_blocked`, grouped differently (float32 rounding).
    """
    pos_dim, f = tokens.pos_dim, ct_NxD.shape[1]
    c = codec_dim(pos_dim)
    if tokens.n == 0:
        return jnp.zeros((c, f), jnp.float32)
    r_MxP, l_M, v_M = tokens.block_at(0)
    m = r_MxP.shape[0]
    ct_MxD = pad_tokens(ct_NxD.astype(jnp.float32), tokens.total)
    h_MxD = _scaled_cotangent(ct_MxD, l_M, v_M, pos_dim, eps, normalise)
    valid_MxP = _valid_positions(l_M, pos_dim)
    if v_M is not None:
        valid_MxP = valid_MxP & v_M[:, None]
    row_MxP = jnp.where(valid_MxP, r_MxP * pos_dim + jnp.arange(pos_dim, dtype=jnp.int32), c)
    token_MxP = jax.lax.broadcasted_iota(jnp.int32, (m, pos_dim), 0)
    row_K, token_K = jax.lax.sort((row_MxP.reshape(-1), token_MxP.reshape(-1)), num_keys=1,
                                  is_stable=True)
    if normalise:
        init = jnp.broadcast_to(-_shared_term(ct_MxD, l_M, v_M, pos_dim, eps), (c, f))
    else:
        init = jnp.zeros((c, f), jnp.float32)
    return init.at[row_K].add(h_MxD.at[token_K].get(mode="promise_in_bounds"),
                              indices_are_sorted=True, mode="drop")
