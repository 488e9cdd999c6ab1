"""The GPU paths: lowered for CUDA on any host, and run where this process sees a GPU.

The first tests export the codec's step for the CUDA platform on whatever host runs them
(jax.export lowers without a GPU): each GPU form must lower to what it names, and the CPU
path must not change with the form. The rest run only where jax has a GPU backend (skipped
elsewhere), so any run of the suite on a GPU machine exercises cuDNN attention, Pallas'
Triton attention and every GPU form of the codec against the references.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kronjax import attention, codec
from kronjax.codec import reference_codec
from kronjax.layers import causal_attention
from kronjax.vocab import ByteVocab

needs_gpu = pytest.mark.skipif(not attention.gpu_present(), reason="no GPU in this process")


def _vocab() -> ByteVocab:
    words = [b"", b" the", b"a", b" of", b"\xff\xfe", b"Hello", b" Hello", b"xyzzy" * 3,
             b" and", b"\n", b" ", b"  ", b"ing", b" q", b"Z", b"0123"]
    return ByteVocab.from_bytes(words, pos_dim=8)


def _problem(n: int = 200, d: int = 6, seed: int = 3) -> tuple[jax.Array, ...]:
    """W (C, d), ids with some outside [0, 16), a cotangent (n, d)."""
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(256 * 8, d)).astype(np.float32))
    ids = jnp.asarray(rng.integers(-1, 17, size=n), jnp.int32)
    g = jnp.asarray(rng.normal(size=(n, d)).astype(np.float32))
    return w, ids, g


def _value_and_grad(vocab: ByteVocab, form: str):  # noqa: ANN202
    rows, lengths = jnp.asarray(vocab.rows), jnp.asarray(vocab.lengths)

    def fn(w: jax.Array, ids: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
        def loss(w: jax.Array) -> jax.Array:
            e = codec.closed_form(w, rows, lengths, ids_N=ids, gpu=form)
            return jnp.sum(jnp.where(jnp.isnan(e), 0.0, e) * g), e
        (_, e), dw = jax.value_and_grad(loss, has_aux=True)(w)
        return e, dw
    return jax.jit(fn)


def test_gpu_forms_lower_for_cuda_as_named_and_leave_cpu_alone() -> None:
    """Lowered for CUDA, each form has the operations it names (sorted scatter; bf16 dots;
    P scatter-adds); lowered for CPU every form is the same program (the blocked loops)."""
    vocab = _vocab()
    w, ids, g = _problem(n=64)
    want = {"gather-scatter": dict(sort=0, sorted_scatter=0, scatter=8, bf16_dot=0),
            "gather-sorted": dict(sort=1, sorted_scatter=1, scatter=1, bf16_dot=0),
            "gather-onehot": dict(sort=0, sorted_scatter=0, scatter=0, bf16_dot=1),
            "onehot-onehot": dict(sort=0, sorted_scatter=0, scatter=0, bf16_dot=2)}
    cpu_programs = set()
    for form in codec.GPU_FORMS:
        fn = _value_and_grad(vocab, form)
        text = jax.export.export(fn, platforms=["cuda"])(w, ids, g).mlir_module()
        ops = [line for line in text.splitlines() if "= \"stablehlo." in line
               or "= stablehlo." in line]
        got = dict(sort=sum("stablehlo.sort" in o for o in ops),
                   sorted_scatter=sum("stablehlo.scatter" in o and "indices_are_sorted = true"
                                      in o for o in ops),
                   scatter=sum("stablehlo.scatter" in o for o in ops),
                   bf16_dot=sum("stablehlo.dot_general" in o and "bf16" in o for o in ops))
        assert got == want[form], form
        cpu = jax.export.export(fn, platforms=["cpu"])(w, ids, g).mlir_module()
        cpu_programs.add("\n".join(line for line in cpu.splitlines()
                                   if not line.lstrip().startswith("#loc")))
    assert len(cpu_programs) == 1


def test_gpu_form_is_checked() -> None:
    from kronjax.embed import KroneckerEmbed
    from kronjax.model import GPTConfig

    w, ids, _ = _problem(n=4)
    vocab = _vocab()
    with pytest.raises(ValueError, match="unknown GPU codec form 'fast'; valid: auto, gather-"):
        codec.closed_form(w, vocab.rows, vocab.lengths, ids_N=ids, gpu="fast")
    with pytest.raises(ValueError, match="unknown GPU codec form 'fast'"):
        GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=4, codec_gpu="fast")
    mod = KroneckerEmbed(vocab, 4, gpu_codec="fast")
    with pytest.raises(ValueError, match="unknown GPU codec form 'fast'"):
        mod.init(jax.random.key(0), ids)
    assert codec.resolve_gpu_form("auto") == codec.GPU_DEFAULT in codec.GPU_FORMS


# -- on a GPU ------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.parametrize("form", codec.GPU_FORMS)
def test_codec_gpu_forms_on_the_gpu_equal_the_formula(form: str) -> None:
    """closed_form's forward and gradient on the GPU (the CUDA branch) against NumPy."""
    vocab = _vocab()
    w, ids, g = _problem()
    e, dw = _value_and_grad(vocab, form)(w, ids, g)
    ok = np.asarray((ids >= 0) & (ids < 16))
    k = reference_codec(vocab.rows, vocab.lengths).astype(np.float64)[np.asarray(ids)[ok]]
    assert np.isnan(np.asarray(e)[~ok]).all()
    np.testing.assert_allclose(np.asarray(e)[ok], k @ np.asarray(w), rtol=1e-5, atol=1e-5)
    want = k.T @ np.asarray(g, np.float64)[ok]
    np.testing.assert_allclose(np.asarray(dw), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@needs_gpu
def test_codec_default_gpu_form_compiles_without_contended_scatter() -> None:
    """The compiled GPU step of the default form: the sorted form has a sort and a sorted
    scatter; a one-hot backward has no scatter at all."""
    vocab = _vocab()
    w, ids, g = _problem()
    hlo = _value_and_grad(vocab, codec.GPU_DEFAULT).lower(w, ids, g).compile().as_text()
    if "sorted" in codec.GPU_DEFAULT:  # XLA may make the sort a CUB radix-sort custom call
        assert "sort" in hlo.lower() and "indices_are_sorted=true" in hlo
    if codec.GPU_DEFAULT.endswith("onehot"):
        assert " scatter(" not in hlo


def _attention_case(kernel: str) -> None:
    """`kernel`'s causal attention, bf16, against the reference: outputs and gradients."""
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, cot = (jax.random.normal(key, (2, 256, 4, 64), jnp.float32) for key in keys)
    q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))

    def loss(impl: str):  # noqa: ANN202
        def fn(q, k, v):  # noqa: ANN001, ANN202
            y = attention.attention(q, k, v, jnp.bfloat16, implementation=impl)
            return jnp.sum(y.astype(jnp.float32) * cot), y
        return jax.jit(jax.value_and_grad(fn, (0, 1, 2), has_aux=True))

    assert attention.kernel_for("cuda", 256, 64, jnp.bfloat16, kernel) == kernel
    (_, y), grads = loss(kernel)(q, k, v)
    (_, y_ref), grads_ref = loss("reference")(q, k, v)
    for got, ref in [(y, y_ref), *zip(grads, grads_ref)]:
        got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
        assert np.abs(got - ref).max() <= 2e-2 * np.abs(ref).max()  # bf16 rounding
    exact = causal_attention(*(a.astype(jnp.float32) for a in (q, k, v)), jnp.float32)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(exact), atol=3e-2)


@needs_gpu
def test_cudnn_attention_on_the_gpu_equals_the_reference() -> None:
    _attention_case("cudnn")
    assert attention.kernel_for("cuda", 256, 64, jnp.bfloat16) == "cudnn"  # what auto runs


@needs_gpu
def test_pallas_triton_attention_on_the_gpu_equals_the_reference() -> None:
    _attention_case("pallas_triton")
