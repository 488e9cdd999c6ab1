"""Every cross-entropy formula: plain, fused with the head in chunks, and per vocabulary shard.

`cross_entropy` is the reference on materialised logits; `vocab_parallel_losses` is its
per-device form when the logits are split over the vocabulary (kronjax.mesh runs it under
shard_map); `fused_cross_entropy` fuses the output head with the loss in chunks of positions,
so no B x T x V logits exist.

The unfused loss writes the B x T x V logits, reads them back for the softmax, writes their
gradient and reads that twice more for the two backward matmuls (for GPT-2 124M on one GPU,
a 64 x 1024 micro-batch at V 50304, the float32 logits alone are 13 GB; what fusing saves
on CPU is in docs/performance.md). Here the
positions go through in J chunks of B x c tokens (a few MB of logits each), and the forward
pass also computes the gradients: softmax(logits) - onehot(target) is consumed at once by
the two matmuls that give d hidden and d head. Nothing of size V per token outlives a chunk.

Without differentiation (evaluation) only the loss is computed, also chunk by chunk.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """Mean next-token loss in nats, computed in float32."""
    losses_BxT = optax.softmax_cross_entropy_with_integer_labels(
        logits_BxTxV.astype(jnp.float32), targets_BxT)
    return losses_BxT.mean()


def vocab_parallel_losses(logits_BxTxv: jax.Array, targets_BxT: jax.Array, axes: tuple[str, ...]
                           ) -> jax.Array:
    """Per-token losses of one shard of the vocabulary (inside shard_map over `axes`): this
    device holds v = V / n logit columns; a pmax and two psums combine the shards, so the
    V axis is never gathered. kronjax.mesh binds it to the mesh."""
    v = logits_BxTxv.shape[-1]
    offset = jax.lax.axis_index(axes) * v
    logits = logits_BxTxv.astype(jnp.float32)
    # The max only stabilises: lse is invariant to it, so it carries no gradient.
    m_BxT = jax.lax.pmax(jax.lax.stop_gradient(logits.max(-1)), axes)
    sumexp_BxT = jax.lax.psum(jnp.exp(logits - m_BxT[..., None]).sum(-1), axes)
    local_BxT = targets_BxT - offset
    mine_BxT = (local_BxT >= 0) & (local_BxT < v)
    picked_BxT = jnp.take_along_axis(logits, jnp.clip(local_BxT, 0, v - 1)[..., None], -1)[..., 0]
    target_logit_BxT = jax.lax.psum(jnp.where(mine_BxT, picked_BxT, 0.0), axes)
    return m_BxT + jnp.log(sumexp_BxT) - target_logit_BxT


def chunk_positions(batch: int, seq_len: int, chunk_tokens: int) -> int:
    """Positions per chunk: about chunk_tokens / batch, rounded down to a divisor of seq_len."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    want = max(1, min(seq_len, chunk_tokens // max(batch, 1)))
    return max(d for d in range(1, want + 1) if seq_len % d == 0)


def _chunks(x_BxTx: jax.Array, c: int) -> jax.Array:
    """(B, T, ...) -> (J, B, c, ...), J = T / c: the scan runs over position chunks, so a
    batch axis sharded over devices stays sharded (it is never the scanned axis)."""
    b, t = x_BxTx.shape[:2]
    return jnp.moveaxis(x_BxTx.reshape((b, t // c, c) + x_BxTx.shape[2:]), 1, 0)


def _unchunk(x_JxBxcx: jax.Array) -> jax.Array:
    j, b, c = x_JxBxcx.shape[:3]
    return jnp.moveaxis(x_JxBxcx, 0, 1).reshape((b, j * c) + x_JxBxcx.shape[3:])


def _chunk_logits(h_BxcxD: jax.Array, w_DxV: jax.Array) -> jax.Array:
    b, c, d = h_BxcxD.shape
    return jnp.dot(h_BxcxD.reshape((b * c, d)), w_DxV, preferred_element_type=jnp.float32)


def _lse_and_target(logits_NxV: jax.Array, t_N: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """exp(logits - row max), its row sum, log-sum-exp, and the target's logit (NaN when the
    target is outside [0, V): no silent wrap-around of negative ids)."""
    m_N = jnp.max(logits_NxV, axis=-1)
    e_NxV = jnp.exp(logits_NxV - m_N[:, None])
    s_N = jnp.sum(e_NxV, axis=-1)
    v = logits_NxV.shape[-1]
    valid_N = (t_N >= 0) & (t_N < v)
    picked_N = jnp.take_along_axis(logits_NxV, jnp.clip(t_N, 0, v - 1)[:, None], axis=-1)[:, 0]
    picked_N = jnp.where(valid_N, picked_N, jnp.nan)
    return e_NxV, s_N, m_N + jnp.log(s_N), picked_N


def _loss_only(h_BxTxD: jax.Array, w_DxV: jax.Array, t_BxT: jax.Array, c: int) -> jax.Array:
    def body(total: jax.Array, xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        h_BxcxD, t_Bxc = xs
        _, _, lse_N, picked_N = _lse_and_target(_chunk_logits(h_BxcxD, w_DxV),
                                                t_Bxc.reshape(-1))
        return total + jnp.sum(lse_N - picked_N), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                            (_chunks(h_BxTxD, c), _chunks(t_BxT, c)))
    return total / t_BxT.size


def _loss_and_grads(h_BxTxD: jax.Array, w_DxV: jax.Array, t_BxT: jax.Array, c: int
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean loss, d loss / d h (h's dtype) and d loss / d w (float32), chunk by chunk."""
    n_tokens = t_BxT.size
    w_VxD = w_DxV.T

    def body(carry: tuple[jax.Array, jax.Array], xs: tuple[jax.Array, jax.Array]
             ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        total, dw_DxV = carry
        h_BxcxD, t_Bxc = xs
        b, tc_, d = h_BxcxD.shape
        t_N = t_Bxc.reshape(-1)
        logits_NxV = _chunk_logits(h_BxcxD, w_DxV)
        e_NxV, s_N, lse_N, picked_N = _lse_and_target(logits_NxV, t_N)
        # d mean-loss / d logits = (softmax - onehot) / n_tokens, built in one fused pass
        hit_NxV = jnp.arange(logits_NxV.shape[-1])[None, :] == t_N[:, None]
        g_NxV = ((e_NxV * (1.0 / s_N)[:, None] - hit_NxV) * (1.0 / n_tokens)
                 ).astype(h_BxcxD.dtype)
        h_NxD = h_BxcxD.reshape((b * tc_, d))
        dh_NxD = jnp.dot(g_NxV, w_VxD, preferred_element_type=jnp.float32)
        dw_DxV = dw_DxV + jnp.dot(h_NxD.T, g_NxV, preferred_element_type=jnp.float32)
        total = total + jnp.sum(lse_N - picked_N)
        return (total, dw_DxV), dh_NxD.astype(h_BxcxD.dtype).reshape((b, tc_, d))

    init = (jnp.zeros((), jnp.float32), jnp.zeros(w_DxV.shape, jnp.float32))
    (total, dw_DxV), dh_chunks = jax.lax.scan(body, init,
                                              (_chunks(h_BxTxD, c), _chunks(t_BxT, c)))
    return total / n_tokens, _unchunk(dh_chunks), dw_DxV


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(h_BxTxD: jax.Array, w_DxV: jax.Array, t_BxT: jax.Array, c: int) -> jax.Array:
    return _loss_only(h_BxTxD, w_DxV, t_BxT, c)


def _fused_fwd(h_BxTxD, w_DxV, t_BxT, c):
    loss, dh, dw = _loss_and_grads(h_BxTxD, w_DxV, t_BxT, c)
    return loss, (dh, dw.astype(w_DxV.dtype), t_BxT)


def _fused_bwd(c, res, g):
    dh, dw, t_BxT = res
    # integer targets take a float0 cotangent
    d_targets = np.zeros(t_BxT.shape, jax.dtypes.float0)
    return (dh * g.astype(dh.dtype), dw * g.astype(dw.dtype), d_targets)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_cross_entropy(h_BxTxD: jax.Array, head: jax.Array, targets_BxT: jax.Array, *,
                        vocab_major: bool, chunk_tokens: int, dtype: Any = None) -> jax.Array:
    """Mean next-token loss (nats, float32) of logits h @ head without materialising them.

    head: (D, V) (an untied `lm_head` kernel) or, with vocab_major, (V, D) (a tied table).
    dtype: the matmuls' input dtype (the model's compute dtype; default h's); logits, softmax
    and the loss are float32. chunk_tokens: about how many tokens each chunk holds (see
    `chunk_positions`). The result and its gradients equal optax's
    softmax_cross_entropy_with_integer_labels(h @ head, targets).mean() up to float rounding.
    """
    if h_BxTxD.ndim != 3 or targets_BxT.shape != h_BxTxD.shape[:2]:
        raise ValueError(f"expected h (B, T, D) and targets (B, T); got {h_BxTxD.shape} and "
                         f"{targets_BxT.shape}")
    d = h_BxTxD.shape[-1]
    w_DxV = head.T if vocab_major else head
    if w_DxV.ndim != 2 or w_DxV.shape[0] != d:
        raise ValueError(f"head of shape {head.shape} does not match hidden size {d} "
                         f"(vocab_major={vocab_major})")
    dtype = dtype or h_BxTxD.dtype
    b, t = targets_BxT.shape
    c = chunk_positions(b, t, chunk_tokens)
    return _fused(h_BxTxD.astype(dtype), w_DxV.astype(dtype), targets_BxT.astype(jnp.int32), c)
