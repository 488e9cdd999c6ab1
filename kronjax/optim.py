"""The optimizer: global-norm clipping, then AdamW on a warmup-cosine schedule.

nanoGPT's recipe, expressed as an optax chain so the train step stays a plain
`tx.update` and the schedule can be logged next to the loss. Weight decay is
masked to matrices (ndim >= 2): decaying biases and LayerNorm scales towards
zero only fights the normalisation. The Kronecker codec is a constant outside
the params tree, so it never reaches this module (see kronjax.embed).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from kronjax.errors import UserError

__all__ = ["lr_schedule", "decay_mask", "make_optimizer", "from_config"]


def lr_schedule(
    *, peak_lr: float, min_lr: float, warmup_steps: int, total_steps: int
) -> optax.Schedule:
    """Linear warmup to `peak_lr`, cosine down to `min_lr` at `total_steps`, then flat.

    The warmup is nanoGPT's `peak * (step + 1) / (warmup + 1)`, so the first
    update already moves the weights (optax's plain warmup from 0 would spend
    step 0 at lr 0). Steps count updates from 0, as optax's own counter does.
    """
    if not peak_lr > 0:
        raise ValueError(f"peak_lr must be > 0, got {peak_lr}")
    if not 0 <= min_lr <= peak_lr:
        raise ValueError(f"min_lr must be in [0, peak_lr={peak_lr}], got {min_lr}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps <= warmup_steps:
        raise ValueError(
            f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps}):"
            " the cosine phase needs at least one step"
        )
    # Linear from peak/(W+1) at step 0 reaches peak at step W, which is exactly
    # nanoGPT's peak*(step+1)/(W+1) on the warmup steps.
    return optax.warmup_cosine_decay_schedule(
        init_value=peak_lr / (warmup_steps + 1),
        peak_value=peak_lr,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=min_lr,
    )


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: arrays with ndim >= 2 (kernels, tables).

    Flax boxes (`nn.Partitioned` from `nn.with_logical_partitioning`) are
    pytree nodes around their value, so mapping over the leaves turns a boxed
    tree into the same boxes holding bools: the mask has exactly the structure
    of `params`, boxed or not, as `optax.masked` requires. Leaves may be arrays
    or `jax.ShapeDtypeStruct`s.
    """

    def leaf_mask(x: Any) -> bool:
        if not hasattr(x, "ndim"):
            raise TypeError(
                f"decay_mask expects array-like leaves (with .ndim), got {type(x).__name__}"
            )
        return x.ndim >= 2

    return jax.tree.map(leaf_mask, params)


def make_optimizer(
    *,
    peak_lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int,
    b1: float = 0.9,
    b2: float = 0.95,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    eps: float = 1e-8,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`chain(clip_by_global_norm, adamw(schedule, mask=decay_mask))` and its schedule.

    The schedule is returned too so the loop can log `schedule(step)` without
    digging into optimizer state. `grad_clip <= 0` disables clipping.
    """
    if not 0 <= b1 < 1 or not 0 <= b2 < 1:
        raise ValueError(f"b1 and b2 must be in [0, 1), got b1={b1}, b2={b2}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    schedule = lr_schedule(
        peak_lr=peak_lr, min_lr=min_lr, warmup_steps=warmup_steps, total_steps=total_steps
    )
    adamw = optax.adamw(
        learning_rate=schedule,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        mask=decay_mask,
    )
    clip = optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw), schedule


def from_config(cfg: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`make_optimizer` from an ml_collections ConfigDict.

    Reads cfg.optim.{peak_lr, min_lr, warmup_steps, b1, b2, weight_decay,
    grad_clip, eps (optional)} and cfg.train.steps as the schedule's length.
    """
    o = cfg.optim
    try:
        kwargs = dict(
            peak_lr=float(o.peak_lr),
            min_lr=float(o.min_lr),
            warmup_steps=int(o.warmup_steps),
            total_steps=int(cfg.train.steps),
            b1=float(o.b1),
            b2=float(o.b2),
            weight_decay=float(o.weight_decay),
            grad_clip=float(o.grad_clip),
        )
    except (AttributeError, KeyError) as e:
        raise ValueError(
            "config is missing an optimizer field; need cfg.optim.{peak_lr, min_lr,"
            " warmup_steps, b1, b2, weight_decay, grad_clip} and cfg.train.steps"
            f" ({e})"
        ) from e
    eps = o.get("eps", None) if hasattr(o, "get") else getattr(o, "eps", None)
    if eps is not None:
        kwargs["eps"] = float(eps)
    try:
        return make_optimizer(**kwargs)
    except ValueError as e:  # a schedule the settings cannot make: say which, in one line
        raise UserError(f"optim / train.steps: {e}") from e
