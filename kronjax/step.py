"""The train step, loss and evaluation as pure functions of (state, batch, rng).

kronjax.run's Plan jits them with the mesh's shardings; tests and benchmarks call them
directly. Gradient accumulation is a `lax.scan` over micro-batches inside one step.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kronjax.loss import cross_entropy
from kronjax.model import GPT, PER_STEP

State = dict[str, Any]  # {"step": int32 scalar, "params": pytree, "opt_state": pytree}
Batch = dict[str, jax.Array]


def init_state(model: GPT, tx: optax.GradientTransformation, seed: int, seq_len: int) -> State:
    ids = jnp.zeros((1, seq_len), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.key(seed), ids)["params"])
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def input_side(params: Any, arm: str) -> jax.Array:
    """The learned input-side matrix: the V x D table or the C x D Kronecker projection."""
    return params["kron"]["projection"] if arm.startswith("kron") else params["wte"]["embedding"]


CrossEntropy = Callable[[jax.Array, jax.Array], jax.Array]


def loss_fn(params: Any, model: GPT, batch: Batch, rng: jax.Array, train: bool, *,
            ce: CrossEntropy = cross_entropy, interceptor: Callable[..., Any] | None = None,
            ce_chunk: int = 0, per_step: dict[str, jax.Array] | None = None) -> jax.Array:
    """Mean loss; `interceptor` (a flax method interceptor) may pin activation shardings.

    ce_chunk > 0: the head and cross-entropy fused in chunks of about that many tokens
    (GPT.loss; no B x T x V logits, `ce` unused); 0: logits, then `ce`. per_step: the
    model's `GPT.per_step` values when the caller computed them (see train_step).
    """
    variables = {"params": params, **({PER_STEP: per_step} if per_step else {})}
    with nn.intercept_methods(interceptor) if interceptor else contextlib.nullcontext():
        if ce_chunk > 0:
            return model.apply(variables, batch["inputs"], batch["targets"], train=train,
                               chunk_tokens=ce_chunk, method=GPT.loss, rngs={"dropout": rng})
        logits = model.apply(variables, batch["inputs"], train=train, rngs={"dropout": rng})
    return ce(logits, batch["targets"])


def table_once_per_step(model: GPT, n_micro: int) -> bool:
    """Whether the step computes `GPT.per_step` (kron_tied's V x D codec table, a function of
    W alone) and its backward once, not once per micro-batch: with several micro-batches."""
    return model.config.has_per_step and n_micro > 1


def train_step(state: State, batch_AxBxT: Batch, rng: jax.Array, *, model: GPT,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               ce: CrossEntropy = cross_entropy, interceptor: Callable[..., Any] | None = None,
               ce_chunk: int = 0, share_table: bool = True) -> tuple[State, dict[str, jax.Array]]:
    """One optimizer step over A micro-batches, gradients accumulated by lax.scan.

    `ce` maps (logits, targets) to the mean loss: kronjax.loss.cross_entropy, or a mesh-aware one
    from kronjax.mesh (vocabulary-parallel under shard_map when the head is split);
    `interceptor` pins activation shardings (kronjax.mesh.activation_interceptor);
    `ce_chunk`: see loss_fn. share_table (kron_tied, A > 1): compute `GPT.per_step` (the codec
    table) and its backward once per step (`table_once_per_step`); False recomputes them per
    micro-batch (the same numbers, for comparison).
    """
    params = state["params"]
    loss_of = functools.partial(loss_fn, model=model, train=True, ce=ce,
                                interceptor=interceptor, ce_chunk=ce_chunk)
    step_rng = jax.random.fold_in(rng, state["step"])
    n_micro = batch_AxBxT["inputs"].shape[0]
    shared, shared_vjp = None, None
    if share_table and table_once_per_step(model, n_micro):
        shared, shared_vjp = jax.vjp(
            lambda p: model.apply({"params": p}, method=GPT.per_step), params)
    # d loss / d (params, shared): the shared values' cotangents are summed over micro-batches
    # and sent through their backward once, after the scan
    grad_fn = jax.value_and_grad(
        lambda p, sh, mb, rng: loss_of(p, batch=mb, rng=rng, per_step=sh),
        argnums=(0, 1) if shared is not None else 0)

    def micro(carry: tuple[Any, jax.Array], xs: tuple[Batch, jax.Array]
              ) -> tuple[tuple[Any, jax.Array], None]:
        grads_acc, loss_acc = carry
        mb, i = xs
        loss, grads = grad_fn(params, shared, mb, jax.random.fold_in(step_rng, i))
        return (jax.tree.map(jnp.add, grads_acc, grads), loss_acc + loss), None

    zeros = jax.tree.map(jnp.zeros_like, params if shared_vjp is None else (params, shared))
    (grads, loss_sum), _ = jax.lax.scan(
        micro, (zeros, jnp.zeros((), jnp.float32)), (batch_AxBxT, jnp.arange(n_micro)))
    if shared_vjp is not None:
        grads, d_shared = grads
        grads = jax.tree.map(jnp.add, grads, shared_vjp(d_shared)[0])
    grads = jax.tree.map(lambda g: g / n_micro, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    metrics = {"loss": loss_sum / n_micro, "grad_norm": optax.global_norm(grads),
               "lr": schedule(state["step"]),
               "input_norm": jnp.linalg.norm(input_side(new_params, model.config.arm))}
    return {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}, metrics


def eval_step(params: Any, batch: Batch, *, model: GPT, ce: CrossEntropy = cross_entropy,
              interceptor: Callable[..., Any] | None = None, ce_chunk: int = 0) -> jax.Array:
    return loss_fn(params, model, batch, jax.random.key(0), False, ce=ce,
                   interceptor=interceptor, ce_chunk=ce_chunk)


def split_micro(batch: dict[str, np.ndarray], n_micro: int) -> dict[str, np.ndarray]:
    """(B, T) -> (A, B/A, T) for the scan over micro-batches."""
    b = batch["inputs"].shape[0]
    if b % n_micro:
        raise ValueError(f"batch {b} is not divisible by grad_accum {n_micro}")
    return {k: v.reshape((n_micro, b // n_micro) + v.shape[1:]) for k, v in batch.items()}
