"""The fused head + cross-entropy against the NumPy formula and against autodiff of optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kronjax.loss import chunk_positions, fused_cross_entropy

B, T, D, V = 3, 12, 16, 40


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(B, T, D)).astype(np.float32)
    w = (rng.normal(size=(D, V)) * 0.5).astype(np.float32)
    t = rng.integers(0, V, size=(B, T)).astype(np.int32)
    return h, w, t


def _numpy_loss_and_grads(h, w, t):
    """mean(logsumexp(l) - l[target]); d/dl = (softmax - onehot) / N, in float64."""
    h64, w64 = h.astype(np.float64).reshape(-1, D), w.astype(np.float64)
    logits = h64 @ w64
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
    tt = t.reshape(-1)
    n = tt.size
    loss = np.mean(lse - logits[np.arange(n), tt])
    g = np.exp(logits - lse[:, None])
    g[np.arange(n), tt] -= 1.0
    g /= n
    return loss, (g @ w64.T).reshape(h.shape), h64.T @ g


@pytest.mark.parametrize("chunk", [1, 7, 12, 36, 10_000])
@pytest.mark.parametrize("vocab_major", [False, True])
def test_matches_numpy_formula(chunk, vocab_major):
    h, w, t = _data()
    head = w.T.copy() if vocab_major else w

    def f(h, head):
        return fused_cross_entropy(h, head, t, vocab_major=vocab_major, chunk_tokens=chunk)

    loss, (dh, dhead) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, head)
    want_loss, want_dh, want_dw = _numpy_loss_and_grads(h, w, t)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dh), want_dh, rtol=1e-4, atol=1e-7)
    got_dw = np.asarray(dhead).T if vocab_major else np.asarray(dhead)
    np.testing.assert_allclose(got_dw, want_dw, rtol=1e-4, atol=1e-7)
    # without differentiation (evaluation): the loss alone, the same number
    np.testing.assert_allclose(float(jax.jit(f)(h, head)), want_loss, rtol=1e-6)


def test_equals_autodiff_of_optax_and_scales_with_cotangent():
    h, w, t = _data(1)

    def unfused(h, w):
        logits = (h.reshape(-1, D) @ w).reshape(B, T, V)
        return 3.0 * optax.softmax_cross_entropy_with_integer_labels(logits, t).mean()

    def fused(h, w):
        return 3.0 * fused_cross_entropy(h, w, t, vocab_major=False, chunk_tokens=8)

    (l0, g0), (l1, g1) = (jax.value_and_grad(f, argnums=(0, 1))(h, w) for f in (unfused, fused))
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_bfloat16_matmuls_stay_close_and_loss_is_float32():
    h, w, t = _data(2)
    loss = fused_cross_entropy(jnp.asarray(h), jnp.asarray(w), t, vocab_major=False,
                               chunk_tokens=9, dtype=jnp.bfloat16)
    dh, dw = jax.grad(lambda h, w: fused_cross_entropy(h, w, t, vocab_major=False,
                                                       chunk_tokens=9, dtype=jnp.bfloat16),
                      argnums=(0, 1))(jnp.asarray(h), jnp.asarray(w))
    want_loss, want_dh, want_dw = _numpy_loss_and_grads(h, w, t)
    assert loss.dtype == jnp.float32 and dw.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), want_loss, rtol=2e-2)
    assert np.abs(np.asarray(dw) - want_dw).max() < 0.05 * np.abs(want_dw).max()
    assert np.abs(np.asarray(dh) - want_dh).max() < 0.05 * np.abs(want_dh).max()


def test_target_outside_vocabulary_gives_nan():
    h, w, t = _data(3)
    t = t.copy()
    t[1, 4] = V
    assert np.isnan(float(fused_cross_entropy(h, w, t, vocab_major=False, chunk_tokens=6)))
    t[1, 4] = -1
    assert np.isnan(float(fused_cross_entropy(h, w, t, vocab_major=False, chunk_tokens=6)))


def test_chunk_positions_divides_sequence():
    assert chunk_positions(16, 256, 512) == 32
    assert chunk_positions(3, 12, 10) == 3       # 10 // 3 = 3 divides 12
    assert chunk_positions(3, 12, 16) == 4       # 16 // 3 = 5 -> 4, the largest divisor <= 5
    assert chunk_positions(64, 1024, 8) == 1     # fewer tokens than the batch: one position
    assert chunk_positions(2, 7, 10_000) == 7    # never more than the sequence
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunk_positions(2, 8, 0)


def test_shape_errors_say_what_was_expected():
    h, w, t = _data()
    with pytest.raises(ValueError, match="does not match hidden size"):
        fused_cross_entropy(h, w, t, vocab_major=True, chunk_tokens=8)   # (D, V) given as (V, D)
    with pytest.raises(ValueError, match=r"expected h \(B, T, D\)"):
        fused_cross_entropy(h, w, t[:, :-1], vocab_major=False, chunk_tokens=8)
