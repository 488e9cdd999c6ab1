"""attention: the per-platform kernels equal the reference; the CPU path is the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kronjax import attention, topology
from kronjax.layers import causal_attention
from kronjax.model import GPTConfig


def _qkv(b: int, t: int, h: int, k: int, seed: int = 0) -> tuple[jax.Array, ...]:
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return tuple(jax.random.normal(key, (b, t, h, k), jnp.float32) for key in keys)


def _numpy_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """softmax(q k^T / sqrt(K) + causal mask) v in float64, written independently."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    t = q.shape[1]
    s = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshk->bthk", p, v)


def test_splash_kernel_equals_the_reference_outputs_and_gradients() -> None:
    """The TPU kernel, run by Pallas' interpreter on CPU, against the reference and NumPy."""
    q, k, v = _qkv(2, 256, 2, 64)
    want = _numpy_attention(q, k, v)
    got = attention.splash_attention(q, k, v, interpret=True)
    ref = causal_attention(q, k, v, jnp.float32)
    np.testing.assert_allclose(np.asarray(ref), want, atol=2e-5)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)

    cot = jax.random.normal(jax.random.PRNGKey(9), q.shape)  # a generic cotangent

    def loss(fn):  # noqa: ANN001, ANN202
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cot)

    g_ref = jax.grad(loss(lambda q, k, v: causal_attention(q, k, v, jnp.float32)),
                     (0, 1, 2))(q, k, v)
    g_splash = jax.grad(loss(lambda q, k, v: attention.splash_attention(q, k, v, interpret=True)),
                        (0, 1, 2))(q, k, v)
    for a, b in zip(g_ref, g_splash):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=5e-5, rtol=1e-4)


def test_pallas_triton_kernel_equals_the_reference_outputs_and_gradients() -> None:
    """The GPU kernel offered beside cuDNN (Pallas' Triton flash attention), run by Pallas'
    interpreter on CPU with blocks smaller than T (so the causal mask crosses blocks)."""
    q, k, v = _qkv(1, 64, 2, 16, seed=5)
    want = _numpy_attention(q, k, v)

    def triton(q, k, v):  # noqa: ANN001, ANN202
        return attention.triton_attention(q, k, v, interpret=True, block=32, bwd_block=16)

    np.testing.assert_allclose(np.asarray(triton(q, k, v)), want, atol=2e-5)
    cot = jax.random.normal(jax.random.PRNGKey(8), q.shape)

    def loss(fn):  # noqa: ANN001, ANN202
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cot)

    g_ref = jax.grad(loss(lambda q, k, v: causal_attention(q, k, v, jnp.float32)),
                     (0, 1, 2))(q, k, v)
    g_triton = jax.grad(loss(triton), (0, 1, 2))(q, k, v)
    for a, b in zip(g_ref, g_triton):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=5e-5, rtol=1e-4)


def test_auto_on_cpu_is_the_reference_bit_for_bit() -> None:
    q, k, v = _qkv(2, 128, 4, 16, seed=3)
    fn = jax.jit(lambda q, k, v: attention.attention(q, k, v, jnp.float32))
    ref = jax.jit(lambda q, k, v: causal_attention(q, k, v, jnp.float32))
    np.testing.assert_array_equal(np.asarray(fn(q, k, v)), np.asarray(ref(q, k, v)))
    g = jax.jit(jax.grad(lambda q: jnp.sum(attention.attention(q, k, v, jnp.float32) ** 2)))(q)
    g_ref = jax.jit(jax.grad(lambda q: jnp.sum(causal_attention(q, k, v, jnp.float32) ** 2)))(q)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("platform, t, k, dtype, impl, dropout, want", [
    ("cpu", 1024, 64, jnp.bfloat16, "auto", False, "reference"),
    ("tpu", 1024, 64, jnp.bfloat16, "auto", False, "splash"),
    ("tpu", 1024, 64, jnp.float32, "auto", False, "splash"),
    ("tpu", 32, 16, jnp.float32, "auto", False, "reference"),  # T not a multiple of 128
    ("tpu", 1024, 64, jnp.bfloat16, "reference", False, "reference"),
    ("tpu", 1024, 64, jnp.bfloat16, "auto", True, "reference"),  # dropout: fused has none
    ("cuda", 1024, 64, jnp.bfloat16, "auto", False, "reference"),  # no GPU in this process
    ("cuda", 1024, 64, jnp.bfloat16, "pallas_triton", False, "reference"),  # no GPU either
    ("tpu", 1024, 64, jnp.bfloat16, "cudnn", False, "reference"),  # a GPU kernel on a TPU
    ("tpu", 1024, 64, jnp.bfloat16, "pallas_triton", False, "reference"),
    ("cpu", 1024, 64, jnp.bfloat16, "splash", False, "reference"),  # a TPU kernel on a CPU
    ("tpu", 1024, 64, jnp.bfloat16, "splash", False, "splash"),
    ("tpu", 1024, 64, jnp.bfloat16, "splash", True, "reference"),
])
def test_kernel_choice(platform: str, t: int, k: int, dtype: object, impl: str, dropout: bool,
                       want: str) -> None:
    if platform == "cuda" and attention.gpu_present():
        pytest.skip("a GPU is present: its kernel would be chosen (tests/test_gpu.py)")
    assert attention.kernel_for(platform, t, k, dtype, impl, dropout) == want


def test_unknown_implementation_is_refused() -> None:
    q, k, v = _qkv(1, 8, 1, 4)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        attention.attention(q, k, v, jnp.float32, implementation="flash")
    with pytest.raises(ValueError, match="unknown attention 'flash'; valid: auto, reference"):
        GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=4, attention="flash")


needs_libtpu = pytest.mark.skipif(not topology.libtpu_available(),
                                  reason="libtpu absent: pip install -e '.[tpu]'")


@needs_libtpu
def test_tpu_compile_takes_the_splash_kernel() -> None:
    """Compiled for a v5e chip, auto attention's forward and backward are Mosaic kernels; the
    reference lowers to plain XLA (docs/scaling.md has the step memory of each)."""
    dev = topology.topology_devices("v5litepod-1")[0]
    shape = jax.ShapeDtypeStruct((2, 512, 4, 64), jnp.bfloat16,
                                 sharding=jax.sharding.SingleDeviceSharding(dev))

    def lowered(impl: str):  # noqa: ANN202
        def loss(q, k, v):  # noqa: ANN001, ANN202
            y = attention.attention(q, k, v, jnp.bfloat16, implementation=impl)
            return jnp.sum(y.astype(jnp.float32) ** 2)
        return jax.jit(jax.grad(loss, (0, 1, 2))).lower(shape, shape, shape)

    hlo = lowered("auto").compile().as_text()
    assert hlo.count("tpu_custom_call") >= 2, "forward and backward kernels expected"
    assert "tpu_custom_call" not in lowered("reference").as_text()
