"""The transformer's building blocks, written for XLA's speed on CPU as well as accelerators.

Each replaces a stock piece whose XLA:CPU lowering was slow in the profile of the train step
(docs/performance.md says by how much): `Linear` as one 2-D matmul, the erf `gelu` as PyTorch
writes it, a two-pass `layer_norm` with a fused backward, a `softmax` with its closed-form
backward, and `causal_attention` in query blocks that skip most of the masked triangle. Each
gives the stock piece's numbers; tests/test_model.py checks the GPT against a NumPy forward.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

INIT_STD = 0.02
LN_EPS = 1e-5


def partitioned(init: Any, names: Sequence[str | None]) -> Any:
    return nn.with_logical_partitioning(init, tuple(names))


class Linear(nn.Module):
    """y = x . W (+ b) contracting x's last len(in_shape) axes; W has explicit logical names."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    names: tuple[str | None, ...]  # for in_shape + out_shape
    std: float = INIT_STD
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        kernel = self.param("kernel", partitioned(nn.initializers.normal(self.std), self.names),
                            self.in_shape + self.out_shape, self.param_dtype)
        # One 2-D matmul (N, In) @ (In, Out), leading axes flattened: contracting several
        # axes of a 3-D activation makes XLA's CPU backend transpose the (N, Out) cotangent
        # for the weight gradient in a slow strided copy (2.5x the whole MLP backward).
        lead = x.shape[:x.ndim - n_in]
        size_in, size_out = math.prod(self.in_shape), math.prod(self.out_shape)
        y = jnp.dot(x.reshape((-1, size_in)).astype(self.dtype),
                    kernel.reshape((size_in, size_out)).astype(self.dtype))
        y = y.reshape(lead + self.out_shape)
        if self.use_bias:
            bias = self.param("bias", partitioned(nn.initializers.zeros, self.names[n_in:]),
                              self.out_shape, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU as PyTorch's nn.GELU() computes it: x/2 * (1 + erf(x/sqrt(2))),
    in float32 inside (one fused elementwise op; 1 + erf would cancel in bfloat16).

    The same function as jax.nn.gelu(approximate=False), whose erfc form is slower on XLA:CPU
    (docs/performance.md).
    """
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * (1.0 / math.sqrt(2.0))))).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None, eps: float
               ) -> jax.Array:
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, statistics in float32
    (two-pass variance, as PyTorch: no E[x^2] - E[x]^2 cancellation); result in x's dtype.

    The hand-written VJP is PyTorch's fused LayerNorm backward: it keeps x, the mean and 1/std
    and does not materialise broadcasts of the statistics, as autodiff's does on XLA:CPU.
    """
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    y = centred * rstd * scale.astype(x32.dtype)
    if bias is not None:
        y = y + bias.astype(x32.dtype)
    # residuals: x itself (alive anyway: the residual stream) and the per-row statistics
    return y.astype(x.dtype), (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps, res, g):
    x, mean, rstd, scale, bias = res
    f32 = rstd.dtype
    g32, xhat32 = g.astype(f32), (x.astype(f32) - mean) * rstd
    batch_axes = tuple(range(g.ndim - 1))
    d_scale = jnp.sum(g32 * xhat32, axis=batch_axes).astype(scale.dtype)
    d_bias = None if bias is None else jnp.sum(g32, axis=batch_axes).astype(bias.dtype)
    dxhat = g32 * scale.astype(f32)
    dx = rstd * (dxhat - jnp.mean(dxhat, axis=-1, keepdims=True)
                 - xhat32 * jnp.mean(dxhat * xhat32, axis=-1, keepdims=True))
    return dx.astype(g.dtype), d_scale, d_bias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """nn.LayerNorm's params ("scale", "bias") and result, computed by `layer_norm`: two-pass
    variance and a fused backward, faster than flax's on XLA:CPU (docs/performance.md)."""

    epsilon: float = LN_EPS
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", partitioned(nn.initializers.ones, ("norm",)), (d,),
                           self.param_dtype)
        bias = (self.param("bias", partitioned(nn.initializers.zeros, ("norm",)), (d,),
                           self.param_dtype) if self.use_bias else None)
        return layer_norm(x, scale, bias, float(self.epsilon)).astype(self.dtype)


@jax.custom_vjp
def softmax(x: jax.Array) -> jax.Array:
    """jax.nn.softmax over the last axis, with the VJP y * (g - sum(g * y)) on the saved
    output: autodiff of jax.nn.softmax makes XLA:CPU materialise a broadcast of the
    normaliser per attention map (time and memory: docs/performance.md)."""
    e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    return e / jnp.sum(e, axis=-1, keepdims=True)


def _softmax_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    y = softmax(x)
    return y, y


def _softmax_bwd(y: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (y * (g - jnp.sum(g * y, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


ATTENTION_CHUNK = 64  # queries per block of causal_attention, at most MAX_CHUNKS blocks
MAX_CHUNKS = 4


def causal_attention(q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxK: jax.Array,
                     dtype: Any, dropout: Callable[[jax.Array], jax.Array] = lambda a: a
                     ) -> jax.Array:
    """softmax(q k^T / sqrt(K), causal) v, scores and softmax in float32: y_BxTxHxK.

    The queries go in up to MAX_CHUNKS blocks, block i attending to keys [0, end_i) only:
    the masked upper triangle is mostly not computed (4 blocks: 10/16 of the products), as
    PyTorch's fused attention skips it. Per query it is the same sum (masked scores are
    exact zeros after the softmax). The second product runs heads-major, which XLA:CPU
    runs faster than contracting into (b, t, h, k) directly (docs/performance.md).
    """
    t, k = q_BxTxHxK.shape[1], q_BxTxHxK.shape[-1]
    n_chunks = max(1, min(MAX_CHUNKS, t // ATTENTION_CHUNK))
    size = -(-t // n_chunks)
    v_BxHxTxK = jnp.swapaxes(v_BxTxHxK, 1, 2)
    outs = []
    for start in range(0, t, size):
        end = min(start + size, t)  # queries [start, end) see keys [0, end)
        att_BxHxQxS = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK[:, start:end], k_BxTxHxK[:, :end],
                                 preferred_element_type=jnp.float32) / math.sqrt(k)
        causal_QxS = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
        att_BxHxQxS = jnp.where(causal_QxS, att_BxHxQxS, jnp.finfo(jnp.float32).min)
        att_BxHxQxS = dropout(softmax(att_BxHxQxS))
        outs.append(jnp.einsum("bhts,bhsk->bhtk", att_BxHxQxS.astype(dtype),
                               v_BxHxTxK[:, :, :end]))
    y_BxHxTxK = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
    return jnp.swapaxes(y_BxHxTxK, 1, 2)
