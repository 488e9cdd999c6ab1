"""GPT (kronjax.model): architecture against a NumPy forward, causality, init scale, arms."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kronjax.codec import reference_codec
from kronjax.embed import ByteOverride
from kronjax.loss import cross_entropy
from kronjax.model import (
    ARMS,
    GPT,
    KRON_TIED_LOGIT_SCALE,
    LOGICAL_AXES,
    GPTConfig,
    flops_per_token,
    n_params_nonembedding,
    param_counts,
)
from kronjax.vocab import ByteVocab

V, T, L, H, D, P = 512, 16, 2, 4, 64, 4
C = 256 * P
N_REAL = 500  # ids 500..511 are padding (empty rows), free for the override test
AXIS_NAMES = {*LOGICAL_AXES, None}


def _tokens() -> list[bytes]:
    rng = np.random.default_rng(0)
    toks = [bytes([i]) for i in range(256)]
    toks += [bytes(rng.integers(97, 123, size=rng.integers(2, 7))) for _ in range(N_REAL - 256)]
    return toks


TOKENS = _tokens()
VOCAB = ByteVocab.from_bytes(TOKENS, pos_dim=P).pad_to(V)


def _config(arm: str, **kw) -> GPTConfig:
    base = dict(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=D, arm=arm, pos_dim=P)
    return GPTConfig(**{**base, **kw})


def _ids(seed: int = 1, b: int = 2) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, N_REAL, (b, T)), jnp.int32)


@functools.cache
def _model(arm: str, **kw) -> tuple[GPT, dict]:
    model = GPT(_config(arm, **kw), VOCAB)
    variables = model.init(jax.random.key(0), _ids())  # eager: jitting init compiles slowly
    return model, nn.meta.unbox(variables)


@functools.cache
def _apply(arm: str):
    model, _ = _model(arm)
    return jax.jit(functools.partial(model.apply, return_hidden=True))


# -- config --------------------------------------------------------------------------------
def test_config_validation_and_from_config():
    with pytest.raises(ValueError, match="bpe_tied, bpe_untied, kron, kron_tied"):
        _config("kronecker")
    with pytest.raises(ValueError, match="divisible"):
        _config("kron", n_head=5)
    with pytest.raises(ValueError, match="kron_mode"):
        _config("kron", kron_mode="fast")
    cfg = ml_collections.ConfigDict(dict(vocab_size=7, block_size=T, n_layer=L, n_head=H,
                                         n_embd=D, arm="kron", pos_dim=P, dtype="bfloat16"))
    got = GPTConfig.from_config(cfg, vocab_size=V)
    assert got == _config("kron", dtype=jnp.bfloat16)
    assert got.dtype == jnp.bfloat16 and got.param_dtype == jnp.float32
    cfg.unknown_key = 1
    with pytest.raises(ValueError, match="unknown_key"):
        GPTConfig.from_config(cfg, V)
    with pytest.raises(ValueError, match="dtype"):
        _config("kron", dtype="float99")


def test_kron_arms_need_a_padded_vocab():
    ids = _ids()
    with pytest.raises(ValueError, match="needs a ByteVocab"):
        GPT(_config("kron")).init(jax.random.key(0), ids)
    with pytest.raises(ValueError, match=r"pad_to\(512\)"):
        GPT(_config("kron"), ByteVocab.from_bytes(TOKENS, P)).init(jax.random.key(0), ids)
    with pytest.raises(ValueError, match="pos_dim"):
        GPT(_config("kron"), ByteVocab.from_bytes(TOKENS, 8).pad_to(V)).init(jax.random.key(0), ids)
    with pytest.raises(ValueError, match="block_size"):
        GPT(_config("bpe_tied")).init(jax.random.key(0), jnp.zeros((1, T + 1), jnp.int32))


# -- param trees ---------------------------------------------------------------------------
@pytest.mark.parametrize("arm", ARMS)
def test_param_tree_per_arm(arm):
    _, variables = _model(arm)
    p = variables["params"]
    shapes = {k: jax.tree.map(np.shape, v) for k, v in p.items()}
    assert set(p) == {"wpe", "h_0", "h_1", "ln_f"} | {
        "bpe_tied": {"wte"}, "bpe_untied": {"wte", "lm_head"},
        "kron": {"kron", "lm_head"}, "kron_tied": {"kron"}}[arm]
    if arm.startswith("kron"):
        assert shapes["kron"] == {"projection": (C, D)}
    else:
        assert shapes["wte"] == {"embedding": (V, D)}
    if "lm_head" in p:
        assert shapes["lm_head"] == {"kernel": (D, V)}
    # No V x D array anywhere except a bpe table or a separate head.
    vxd = [path for path, x in jax.tree_util.tree_leaves_with_path(p) if set(x.shape) == {V, D}]
    assert len(vxd) == {"bpe_tied": 1, "bpe_untied": 2, "kron": 1, "kron_tied": 0}[arm]
    assert shapes["h_0"]["attn"]["c_attn"]["kernel"] == (D, 3, H, D // H)
    assert shapes["h_0"]["attn"]["c_proj"]["kernel"] == (H, D // H, D)
    assert "perturbations" not in variables and set(variables) == {"params"}


@pytest.mark.parametrize("arm", ARMS)
@pytest.mark.parametrize("bias", [True, False])
def test_param_counts_match_hand_arithmetic(arm, bias):
    config = _config(arm, bias=bias)
    shapes = jax.eval_shape(GPT(config, VOCAB).init, jax.random.key(0), _ids())
    ln = 2 * D if bias else D
    block = 12 * D * D + 2 * ln + (3 * D + D + 4 * D + D if bias else 0)
    rest = T * D + L * block + ln
    input_side = C * D if arm.startswith("kron") else V * D
    head = 0 if arm in ("bpe_tied", "kron_tied") else V * D
    assert param_counts(shapes, config) == {"input_side": input_side, "head": head, "rest": rest,
                                            "total": input_side + head + rest}
    n = n_params_nonembedding(shapes, config)
    assert n == rest - T * D + V * D  # same N for every arm: equal transformer compute
    if arm == "bpe_tied":  # nanoGPT: get_num_params(non_embedding=True) = total - wpe
        assert n == input_side + rest - T * D
    assert flops_per_token(config, n) == 6 * n + 12 * L * H * (D // H) * T


@pytest.mark.parametrize("arm", ARMS)
def test_every_param_has_logical_axis_names(arm):
    boxed = jax.eval_shape(GPT(_config(arm), VOCAB).init, jax.random.key(0), _ids())["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), leaf
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= AXIS_NAMES, leaf.names


# -- forward against an independent NumPy implementation ---------------------------------
def _np_forward(params, ids, emb_VxD, head_VxD):
    """nanoGPT's forward in float64 NumPy: pre-LN blocks, exact GELU, causal softmax."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    erf = np.vectorize(math.erf)

    def ln(x, q):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * q["scale"] + q.get("bias", 0.0)

    t = ids.shape[1]
    x = emb_VxD[ids] + p["wpe"]["embedding"][:t]
    for i in range(L):
        blk = p[f"h_{i}"]
        a = ln(x, blk["ln_1"])
        qkv = np.einsum("btd,dchk->btchk", a, blk["attn"]["c_attn"]["kernel"])
        qkv = qkv + blk["attn"]["c_attn"]["bias"]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        s = np.einsum("bthk,bshk->bhts", q, k) / math.sqrt(D // H)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        y = np.einsum("bhts,bshk->bthk", w, v)
        x = x + np.einsum("bthk,hkd->btd", y, blk["attn"]["c_proj"]["kernel"]) \
            + blk["attn"]["c_proj"]["bias"]
        m = ln(x, blk["ln_2"]) @ blk["mlp"]["c_fc"]["kernel"] + blk["mlp"]["c_fc"]["bias"]
        m = 0.5 * m * (1.0 + erf(m / math.sqrt(2.0)))
        x = x + m @ blk["mlp"]["c_proj"]["kernel"] + blk["mlp"]["c_proj"]["bias"]
    h = ln(x, p["ln_f"])
    return h @ head_VxD.T


@pytest.mark.parametrize("arm", ARMS)
def test_forward_matches_numpy_reference(arm):
    _, variables = _model(arm)
    p = variables["params"]
    ids = np.asarray(_ids())
    if arm.startswith("kron"):
        k_VxC = reference_codec(VOCAB.rows, VOCAB.lengths).astype(np.float64)
        emb = k_VxC @ np.asarray(p["kron"]["projection"], np.float64)
    else:
        emb = np.asarray(p["wte"]["embedding"], np.float64)
    head = emb if arm in ("bpe_tied", "kron_tied") else np.asarray(p["lm_head"]["kernel"]).T
    if arm == "kron_tied":
        head = head * KRON_TIED_LOGIT_SCALE
    want = _np_forward(p, ids, emb, np.asarray(head, np.float64))
    got = _apply(arm)(variables, jnp.asarray(ids))["logits"]
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("batch", [2, 2 * V // T + 2])
def test_kron_tied_logits_are_hidden_times_codec_table(batch: int):
    """The logit factor goes on h when B x T <= V, else on the table: same logits."""
    _, variables = _model("kron_tied")
    out = _apply("kron_tied")(variables, _ids(b=batch))
    k_VxC = reference_codec(VOCAB.rows, VOCAB.lengths).astype(np.float64)
    w_CxD = np.asarray(variables["params"]["kron"]["projection"], np.float64)
    want = np.asarray(out["hidden"], np.float64) @ (k_VxC @ w_CxD).T * KRON_TIED_LOGIT_SCALE
    np.testing.assert_allclose(out["logits"], want, rtol=1e-4, atol=1e-3 * np.abs(want).max())


# -- causality -----------------------------------------------------------------------------
@pytest.mark.parametrize("arm", ARMS)
def test_future_ids_do_not_change_past_logits(arm):
    _, variables = _model(arm)
    ids = _ids()
    base = _apply(arm)(variables, ids)["logits"]
    for t in (0, 5, T - 2):
        changed = ids.at[:, t + 1:].set((ids[:, t + 1:] + 7) % N_REAL)
        out = _apply(arm)(variables, changed)["logits"]
        np.testing.assert_array_equal(out[:, :t + 1], base[:, :t + 1])
        assert not np.allclose(out[:, t + 1:], base[:, t + 1:])


@pytest.mark.parametrize("arm", ARMS)
def test_gradient_wrt_future_embeddings_is_zero(arm):
    model, variables = _model(arm)
    x_BxTxD = model.apply(variables, _ids(), method=GPT.embed)

    def summed_T(x):  # row t of its Jacobian is the gradient of logits[:, t].sum()
        return model.apply(variables, x, method=GPT.from_embeddings).sum(axis=(0, 2))

    g_TxBxTxD = np.asarray(jax.jit(jax.jacrev(summed_T))(x_BxTxD))
    per_pos_TxT = np.abs(g_TxBxTxD).sum(axis=(1, 3))  # [t, s]: |d logits_t / d x_s|
    assert np.all(per_pos_TxT[np.triu_indices(T, 1)] == 0.0)
    assert np.all(per_pos_TxT[np.tril_indices(T)] > 0.0)


# -- init scale ----------------------------------------------------------------------------
@pytest.mark.parametrize("arm", [
    *ARMS[:3],
    "kron_tied",
])
def test_first_loss_is_ln_vocab(arm):
    _, variables = _model(arm)
    ids = _ids(seed=3)
    logits = _apply(arm)(variables, ids)["logits"]
    loss = float(cross_entropy(logits[:, :-1], ids[:, 1:]))
    assert abs(loss - math.log(V)) < 0.1, loss


def test_cross_entropy_is_mean_negative_log_softmax():
    logits = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32)
    targets = np.array([[0, 4, 2], [1, 1, 3]])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, targets[..., None], -1).mean()
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32),
                                             jnp.asarray(targets)), want, rtol=1e-2)
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), jnp.asarray(targets)), want,
                               rtol=1e-6)


@pytest.mark.parametrize("arm", ARMS)
def test_fused_loss_equals_logits_then_cross_entropy(arm):
    """GPT.loss (head + cross-entropy in chunks, no logits) has the unfused loss and gradients."""
    model, variables = _model(arm)
    ids, targets = _ids(seed=5, b=3), _ids(seed=6, b=3)

    def unfused(params):
        return cross_entropy(model.apply({"params": params}, ids), targets)

    def fused(params):
        return model.apply({"params": params}, ids, targets, chunk_tokens=8, method=GPT.loss)

    l0, g0 = jax.jit(jax.value_and_grad(unfused))(variables["params"])
    l1, g1 = jax.jit(jax.value_and_grad(fused))(variables["params"])
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    flat0, flat1 = jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)
    assert len(flat0) == len(flat1)
    for (path, a), b in zip(flat0, flat1):
        scale = float(np.abs(np.asarray(a)).max()) + 1e-12
        err = float(np.abs(np.asarray(a) - np.asarray(b)).max())
        assert err <= 1e-4 * scale, (jax.tree_util.keystr(path), err, scale)


# -- byte overrides ------------------------------------------------------------------------
@pytest.mark.parametrize("arm", ["kron", "kron_tied"])
def test_override_changes_only_later_positions_and_equals_vocab_edit(arm):
    model, variables = _model(arm)
    ids = _ids()
    word, (b, s), free_id = b"zqxjw", (1, 6), V - 1
    override = ByteOverride.single(tuple(ids.shape), (b, s), word, P)
    base = _apply(arm)(variables, ids)["logits"]
    # ByteOverride is a NamedTuple, so it crosses jit as a pytree argument.
    run = jax.jit(lambda v, i, o: model.apply(v, i, override=o))
    got = run(variables, ids, override)
    np.testing.assert_array_equal(got[:, :s], base[:, :s])
    np.testing.assert_array_equal(got[1 - b], base[1 - b])
    assert not np.any(np.all(np.isclose(got[b, s:], base[b, s:]), axis=-1))
    # Independent construction: a vocabulary whose spare id has the word's bytes.
    edited = ByteVocab.from_bytes(TOKENS + [None] * (V - 1 - N_REAL) + [word], pos_dim=P)
    want = GPT(model.config, edited).apply(variables, ids.at[b, s].set(free_id))
    cols = np.arange(V) != free_id if arm == "kron_tied" else slice(None)  # the tied head
    np.testing.assert_allclose(got[..., cols], want[..., cols], rtol=1e-5, atol=1e-5)


def test_override_rejected_for_bpe_arms():
    model, variables = _model("bpe_untied")
    ids = _ids()
    with pytest.raises(ValueError, match="kron arm"):
        model.apply(variables, ids, override=ByteOverride.single(tuple(ids.shape), (0, 0), b"a", P))


# -- dtypes, hidden states, dropout -------------------------------------------------------
@pytest.mark.parametrize("arm", ["bpe_untied", "kron_tied"])  # wte + Linear head; kron + attend
def test_bf16_compute_returns_float32_logits(arm):
    _, variables = _model(arm)
    model16 = GPT(_config(arm, dtype="bfloat16"), VOCAB)
    out = jax.jit(functools.partial(model16.apply, return_hidden=True))(variables, _ids())
    assert out["logits"].dtype == jnp.float32 and out["hidden"].dtype == jnp.bfloat16
    ref = _apply(arm)(variables, _ids())["logits"]
    assert np.all(np.isfinite(out["logits"]))
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(out["logits"], ref, atol=0.1 * scale)
    params16 = jax.eval_shape(model16.init, jax.random.key(0), _ids())["params"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.meta.unbox(params16)))


def test_return_hidden_structure():
    _, variables = _model("kron")
    out = _apply("kron")(variables, _ids())
    assert set(out) == {"logits", "hidden", "blocks"}
    assert out["hidden"].shape == (2, T, D) and len(out["blocks"]) == L
    assert all(b.shape == (2, T, D) for b in out["blocks"])
    np.testing.assert_allclose(out["hidden"].mean(-1), 0.0, atol=1e-5)  # final LN, unit scale


def test_dropout_only_in_training():
    model = GPT(_config("kron", dropout=0.2), VOCAB)
    _, variables = _model("kron")
    ids = _ids()
    run = jax.jit(lambda v, i, key, train: model.apply(v, i, train=train, rngs={"dropout": key}),
                  static_argnums=3)
    eval_a = run(variables, ids, jax.random.key(1), False)
    np.testing.assert_array_equal(eval_a, run(variables, ids, jax.random.key(2), False))
    np.testing.assert_allclose(eval_a, _apply("kron")(variables, ids)["logits"], atol=1e-6)
    train_a = run(variables, ids, jax.random.key(1), True)
    assert not np.allclose(train_a, eval_a)
    assert not np.allclose(train_a, run(variables, ids, jax.random.key(2), True))
