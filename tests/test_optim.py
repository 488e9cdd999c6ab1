"""The optimizer matches nanoGPT's schedule and a hand-computed AdamW step."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kronjax import optim

PEAK, MIN, WARM, TOTAL = 6e-4, 6e-5, 10, 110


def nanogpt_lr(it: int) -> float:
    """nanoGPT's get_lr, with lr_decay_iters = TOTAL."""
    if it < WARM:
        return PEAK * (it + 1) / (WARM + 1)
    if it > TOTAL:
        return MIN
    ratio = (it - WARM) / (TOTAL - WARM)
    return MIN + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (PEAK - MIN)


@pytest.mark.parametrize("step", [0, 1, WARM - 1, WARM, 35, 60, TOTAL - 1, TOTAL, TOTAL + 50])
def test_schedule_matches_nanogpt(step: int) -> None:
    sched = optim.lr_schedule(peak_lr=PEAK, min_lr=MIN, warmup_steps=WARM, total_steps=TOTAL)
    assert float(sched(step)) == pytest.approx(nanogpt_lr(step), rel=1e-5)


def test_schedule_landmarks() -> None:
    sched = optim.lr_schedule(peak_lr=PEAK, min_lr=MIN, warmup_steps=WARM, total_steps=TOTAL)
    assert float(sched(0)) > 0  # the first update moves the weights
    assert float(sched(WARM)) == pytest.approx(PEAK)
    assert float(sched((WARM + TOTAL) // 2)) == pytest.approx((PEAK + MIN) / 2, rel=1e-5)
    assert float(sched(TOTAL)) == pytest.approx(MIN)
    assert float(sched(10 * TOTAL)) == pytest.approx(MIN)


def test_schedule_without_warmup_starts_at_peak() -> None:
    sched = optim.lr_schedule(peak_lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=4)
    assert float(sched(0)) == pytest.approx(1.0)
    assert float(sched(2)) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(peak_lr=0.0, min_lr=0.0, warmup_steps=1, total_steps=5), "peak_lr"),
        (dict(peak_lr=1e-3, min_lr=1e-2, warmup_steps=1, total_steps=5), "min_lr"),
        (dict(peak_lr=1e-3, min_lr=0.0, warmup_steps=-1, total_steps=5), "warmup_steps"),
        (dict(peak_lr=1e-3, min_lr=0.0, warmup_steps=5, total_steps=5), "total_steps"),
    ],
)
def test_schedule_rejects_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        optim.lr_schedule(**kwargs)


class Tiny(nn.Module):
    """Dense + LayerNorm, optionally with logically partitioned (boxed) params."""

    boxed: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def init(fn, names):  # noqa: ANN001, ANN202
            return nn.with_logical_partitioning(fn, names) if self.boxed else fn

        x = nn.Dense(
            4,
            kernel_init=init(nn.initializers.lecun_normal(), ("embed", "mlp")),
            bias_init=init(nn.initializers.zeros, ("mlp",)),
        )(x)
        return nn.LayerNorm(
            scale_init=init(nn.initializers.ones, ("mlp",)),
            bias_init=init(nn.initializers.zeros, ("mlp",)),
        )(x)


@pytest.mark.parametrize("boxed", [False, True])
def test_decay_mask_only_matrices(boxed: bool) -> None:
    params = Tiny(boxed=boxed).init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    mask = optim.decay_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    if boxed:
        assert isinstance(mask["Dense_0"]["kernel"], nn.Partitioned)
        mask = nn.meta.unbox(mask)
    assert mask == {
        "Dense_0": {"kernel": True, "bias": False},
        "LayerNorm_0": {"scale": False, "bias": False},
    }


def test_decay_mask_on_abstract_params() -> None:
    abstract = jax.eval_shape(lambda: Tiny().init(jax.random.key(0), jnp.ones((1, 3))))
    mask = optim.decay_mask(abstract["params"])
    assert mask["Dense_0"]["kernel"] is True and mask["LayerNorm_0"]["scale"] is False


def test_decay_mask_rejects_non_arrays() -> None:
    with pytest.raises(TypeError, match="array-like"):
        optim.decay_mask({"w": "not an array"})


def _numpy_adamw_step(p, g, lr, clip, b1, b2, eps, wd, mask):  # noqa: ANN001, ANN202
    """One AdamW update from zero moments, written out by hand."""
    norm = math.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in g.values()))
    scale = min(1.0, clip / norm)
    out = {}
    for k in p:
        gk = g[k].astype(np.float64) * scale
        m_hat = (1 - b1) * gk / (1 - b1)
        v_hat = (1 - b2) * gk**2 / (1 - b2)
        upd = m_hat / (np.sqrt(v_hat) + eps)
        if mask[k]:
            upd = upd + wd * p[k]
        out[k] = p[k] - lr * upd
    return out


@pytest.mark.parametrize("boxed", [False, True])
def test_one_adamw_step_matches_numpy(boxed: bool) -> None:
    rng = np.random.default_rng(0)
    p_np = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,)), "s": rng.normal(size=(4,))}
    g_np = {k: 3.0 * rng.normal(size=v.shape) for k, v in p_np.items()}  # norm >> clip
    kw = dict(b1=0.8, b2=0.9, eps=1e-6, weight_decay=0.5, grad_clip=1.0)
    tx, sched = optim.make_optimizer(
        peak_lr=1e-2, min_lr=1e-3, warmup_steps=3, total_steps=20, **kw
    )

    def wrap(tree: dict) -> dict:
        tree = {k: jnp.asarray(v, jnp.float32) for k, v in tree.items()}
        if boxed:
            tree = {k: nn.Partitioned(v, names=("x",) * v.ndim) for k, v in tree.items()}
        return tree

    params, grads = wrap(p_np), wrap(g_np)
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    new = jax.tree.map(lambda a, b: a + b, params, updates)
    if boxed:
        new = nn.meta.unbox(new)
    expect = _numpy_adamw_step(
        p_np, g_np, float(sched(0)), kw["grad_clip"], kw["b1"], kw["b2"], kw["eps"],
        kw["weight_decay"], {"w": True, "b": False, "s": False},
    )
    for k in p_np:
        np.testing.assert_allclose(np.asarray(new[k]), expect[k], rtol=1e-5, atol=1e-6)
    # Decay really is masked: without it the matrix would land elsewhere.
    no_decay = _numpy_adamw_step(
        p_np, g_np, float(sched(0)), 1.0, 0.8, 0.9, 1e-6, 0.5, {"w": False, "b": False, "s": False}
    )
    assert not np.allclose(np.asarray(new["w"]), no_decay["w"], rtol=1e-6, atol=1e-8)


def test_from_config() -> None:
    cfg = ml_collections.ConfigDict(
        dict(
            optim=dict(peak_lr=PEAK, min_lr=MIN, warmup_steps=WARM, b1=0.9, b2=0.95,
                       weight_decay=0.1, grad_clip=1.0),
            train=dict(steps=TOTAL),
        )
    )
    tx, sched = optim.from_config(cfg)
    assert float(sched(WARM)) == pytest.approx(PEAK)
    assert float(sched(TOTAL)) == pytest.approx(MIN)
    params = {"w": jnp.ones((2, 2))}
    tx.update(params, tx.init(params), params)


def test_from_config_names_missing_field() -> None:
    cfg = ml_collections.ConfigDict(dict(optim=dict(peak_lr=1e-3), train=dict(steps=10)))
    with pytest.raises(ValueError, match="cfg.optim"):
        optim.from_config(cfg)


def test_warmup_not_shorter_than_the_run_is_a_user_error() -> None:
    """train prints UserErrors in one line; a warmup as long as the run used to escape as a
    bare ValueError with a traceback."""
    from kronjax.config import build_config
    from kronjax.errors import UserError
    from kronjax.optim import from_config

    cfg = build_config(None, [("optim.warmup_steps", "1000"), ("train.steps", "40")])
    with pytest.raises(UserError, match=r"total_steps \(40\) must exceed warmup_steps \(1000\)"):
        from_config(cfg)
