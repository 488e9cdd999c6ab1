"""Device mesh, logical-axis rules, state and batch shardings; the loss bound to the mesh.

The mesh has three axes, sized by `config.mesh` (-1 fills the remaining devices):

  data    pure data parallelism: params replicated, batch split
  fsdp    data parallelism with params, gradients and optimizer state split (ZeRO-3 style)
  tensor  model parallelism: vocabulary, heads and MLP width split (Megatron style)

Params carry logical axis names (model.py's docstring); one rules table (`DEFAULT_RULES`,
overridable per name in `config.mesh.rules`) maps each name to mesh axes, maxtext style. A
name's rule is applied in table order and a mesh axis is used at most once per array (flax's
semantics), so the Kronecker projection W (codec, embed) splits its C rows over fsdp while a
table (vocab, embed) splits V over tensor and D over fsdp. A dimension a rule's axes do not
divide is kept whole on the axes that do not fit (logged once), so any mesh runs any model.

The codec (V x P bytes, lengths, or the dense table) is a constant closed over by the jitted
step, never an argument: XLA keeps constants replicated, and nothing here can shard it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kronjax.attention import AttentionCore
from kronjax.errors import UserError
from kronjax.loss import cross_entropy, vocab_parallel_losses
from kronjax.model import GPT, LOGICAL_AXES

log = logging.getLogger("kronjax.mesh")

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = "batch"  # the logical name of a batch dimension (activations and data)
Axes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, Axes], ...]

# Order matters: earlier rules claim a mesh axis first within one array.
DEFAULT_RULES: Rules = (
    (BATCH, ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("codec", "fsdp"),
    ("embed", "fsdp"),
    ("position", None),
    ("norm", None),
)

# -- mesh and rules ------------------------------------------------------------------------
def mesh_shape(sizes: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
    """Resolve {"data", "fsdp", "tensor"} sizes (one may be -1: the rest) for n_devices."""
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    fill = [i for i, s in enumerate(shape) if s == -1]
    if len(fill) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh sizes must be positive, with at most one -1 (fill); got "
                         f"{dict(zip(MESH_AXES, shape))}")
    known = math.prod(s for s in shape if s != -1)
    if fill:
        if n_devices % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))}: {n_devices} devices are not "
                             f"divisible by the fixed axes' product {known}")
        shape[fill[0]] = n_devices // known
    if math.prod(shape) != n_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} has {math.prod(shape)} devices "
                         f"but there are {n_devices}; set one axis to -1 to fill")
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all, every process).

    Auto axis types: shardings are given at the jit boundary and XLA propagates the rest.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes or {"data": -1}, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def _as_axes(value: Any, name: str) -> Axes:
    """A config value ("", "fsdp", "data,fsdp", None, a list) -> mesh axes."""
    if value is None or value == "" or value == () or value == []:
        return None
    parts = tuple(value.split(",")) if isinstance(value, str) else tuple(value)
    parts = tuple(p.strip() for p in parts if p.strip())
    bad = [p for p in parts if p not in MESH_AXES]
    if bad:
        raise ValueError(f"rule for {name!r} names unknown mesh axes {bad}; valid: {MESH_AXES}")
    return parts[0] if len(parts) == 1 else parts


def make_rules(overrides: Mapping[str, Any] | None = None) -> Rules:
    """DEFAULT_RULES with some names remapped ({"codec": None, "embed": "fsdp,tensor"})."""
    overrides = dict(overrides or {})
    valid = (BATCH,) + LOGICAL_AXES
    if unknown := sorted(set(overrides) - set(valid)):
        raise UserError(f"unknown logical axis names {unknown} in mesh.rules; valid: {valid}")
    return tuple((name, _as_axes(overrides[name], name) if name in overrides else axes)
                 for name, axes in DEFAULT_RULES)


def rules_from_config(cfg: Any) -> Rules:
    mesh_cfg = cfg.get("mesh") if hasattr(cfg, "get") else None
    rules = mesh_cfg.get("rules") if mesh_cfg is not None else None
    return make_rules(rules.to_dict() if hasattr(rules, "to_dict") else rules)


def mesh_sizes_from_config(cfg: Any) -> dict[str, int]:
    mesh_cfg = cfg.get("mesh") if hasattr(cfg, "get") else None
    if mesh_cfg is None:
        return {"data": -1, "fsdp": 1, "tensor": 1}
    return {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}


def _axes_tuple(axes: Axes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


_warned: set[tuple[Any, ...]] = set()


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, what: str = "") -> P:
    """Drop, per dimension, size-1 mesh axes (no-ops) and then trailing axes whose product
    does not divide the size."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    out: list[Axes] = []
    for dim, (size, axes) in enumerate(zip(shape, entries)):
        axes = tuple(a for a in _axes_tuple(axes) if mesh.shape[a] > 1) or None
        kept = list(_axes_tuple(axes))
        while kept and size % math.prod(mesh.shape[a] for a in kept):
            kept.pop()
        if len(kept) < len(_axes_tuple(axes)):
            key = (what, dim, size, axes)
            if key not in _warned:
                _warned.add(key)
                log.info("%s dim %d (size %d) is not divisible over %s: sharded over %s", what,
                         dim, size, axes, tuple(kept) or "nothing (replicated)")
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def logical_sharding(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                     rules: Rules, what: str = "") -> NamedSharding:
    """Logical names of an array's dimensions -> its NamedSharding on mesh (fitted)."""
    spec = nn.logical_to_mesh_axes(tuple(names), rules)
    return NamedSharding(mesh, fit_spec(spec, shape, mesh, what))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# -- state shardings -----------------------------------------------------------------------
def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def _path_str(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)


def param_shardings(boxed_params: Any, mesh: Mesh, rules: Rules) -> Any:
    """Shardings for the (unboxed) params tree from its boxed `jax.eval_shape`."""
    logical = nn.get_partition_spec(boxed_params)
    abstract = nn.meta.unbox(boxed_params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    specs = jax.tree.leaves(logical, is_leaf=_is_spec)
    if len(specs) != len(flat):
        raise ValueError("logical partition specs do not match the params tree")
    out = []
    for (path, leaf), spec in zip(flat, specs):
        names = tuple(spec) if isinstance(spec, P) else ()
        names = names + (None,) * (len(leaf.shape) - len(names))
        out.append(logical_sharding(names, leaf.shape, mesh, rules, _path_str(path)))
    return jax.tree.unflatten(treedef, out)


def _dict_suffix(path: Sequence[Any]) -> tuple[str, ...]:
    """The trailing run of dict keys of a key path: a param's own path inside opt_state."""
    keys: list[str] = []
    for k in reversed(tuple(path)):
        if not isinstance(k, jax.tree_util.DictKey):
            break
        keys.append(str(k.key))
    return tuple(reversed(keys))


def opt_state_shardings(abstract_opt_state: Any, abstract_params: Any, param_sh: Any,
                        mesh: Mesh) -> Any:
    """Each optimizer-state leaf that mirrors a param (Adam's mu and nu, masked or not) gets
    that param's sharding; everything else (counts, schedules) is replicated.

    Matched by the param's path (the trailing dict keys) and shape, which works for any optax
    chain, including `optax.masked` states whose masked-out leaves are absent.
    """
    by_path: dict[tuple[str, ...], tuple[tuple[int, ...], NamedSharding]] = {}
    for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                jax.tree.leaves(param_sh)):
        by_path[_dict_suffix(path)] = (tuple(leaf.shape), sh)

    def pick(path: Any, leaf: Any) -> NamedSharding:
        hit = by_path.get(_dict_suffix(path))
        if hit is not None and hit[0] == tuple(getattr(leaf, "shape", ())):
            return hit[1]
        if getattr(leaf, "ndim", 0) >= 2:
            log.warning("optimizer state %s matches no param: replicated", _path_str(path))
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def boxed_params(model: GPT, seq_len: int) -> Any:
    """`jax.eval_shape` of model.init: ShapeDtypeStructs inside their logical-name boxes."""
    ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x)["params"], ids)


def state_shardings(model: GPT, tx: optax.GradientTransformation, seq_len: int, mesh: Mesh,
                    rules: Rules) -> tuple[dict[str, Any], dict[str, Any]]:
    """(abstract state, shardings) for train.init_state's {"step", "params", "opt_state"}.

    The abstract state's leaves are ShapeDtypeStructs carrying their sharding: the target for
    `jax.jit(init, out_shardings=...)`, an orbax restore onto this mesh, or an AOT compile.
    """
    boxed = boxed_params(model, seq_len)
    params = nn.meta.unbox(boxed)
    p_sh = param_shardings(boxed, mesh, rules)
    opt = jax.eval_shape(tx.init, params)
    o_sh = opt_state_shardings(opt, params, p_sh, mesh)
    shardings = {"step": replicated(mesh), "params": p_sh, "opt_state": o_sh}
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "opt_state": opt}
    return with_shardings(abstract, shardings), shardings


def with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def shard_bytes(abstract: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (or arrays)."""
    total = 0
    for leaf in jax.tree.leaves(abstract):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


# -- batches -------------------------------------------------------------------------------
def batch_devices(mesh: Mesh, rules: Rules) -> tuple[int, tuple[str, ...]]:
    """(n, axes): the batch dimension splits n ways, over the mesh axes "batch" maps to."""
    spec = nn.logical_to_mesh_axes((BATCH,), rules)
    axes = tuple(a for a in _axes_tuple(spec[0] if len(spec) else None) if mesh.shape[a] > 1)
    return math.prod(mesh.shape[a] for a in axes), axes


def check_batch_divides(mesh: Mesh, rules: Rules, micro_shape: Sequence[int]) -> None:
    """Refuse micro-batches (A, B/A, T) whose rows do not split over the data-parallel
    devices: fit_spec would replicate them, every device computing the whole batch, silently."""
    n, axes = batch_devices(mesh, rules)
    accum, micro = int(micro_shape[0]), int(micro_shape[1])
    if micro % n:
        b, unit = micro * accum, n * accum
        nearest = sorted({x for x in ((b // unit) * unit, (b // unit + 1) * unit) if x > 0})
        raise UserError(
            f"train.batch_size {b} (micro-batches of {micro}) does not divide over the {n} "
            f"data-parallel devices ({' x '.join(f'{a}={mesh.shape[a]}' for a in axes)}): "
            f"use train.batch_size {' or '.join(map(str, nearest))}, or another mesh")


def batch_sharding(mesh: Mesh, rules: Rules, shape: Sequence[int], batch_dim: int = 0
                   ) -> NamedSharding:
    """Sharding of a data array whose dimension `batch_dim` is the batch (others whole)."""
    names = [None] * len(shape)
    names[batch_dim] = BATCH
    return logical_sharding(names, shape, mesh, rules, f"batch {tuple(shape)}")


def process_rows(sharding: NamedSharding, shape: Sequence[int], batch_dim: int = 0
                 ) -> tuple[int, int]:
    """(k, n): this process holds the k-th of n equal, contiguous row blocks of the batch.

    Processes whose devices share rows (a batch replicated over "tensor", say) get the same
    k; the n blocks tile the batch exactly once. Raises when the layout is not like that.
    """
    b = int(shape[batch_dim])
    blocks: dict[int, set[tuple[int, int]]] = {}
    for device, index in sharding.devices_indices_map(tuple(shape)).items():
        sl = index[batch_dim]
        start, stop, _ = sl.indices(b)
        blocks.setdefault(device.process_index, set()).add((start, stop))
    spans = {}
    for proc, ranges in blocks.items():
        lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
        covered = np.zeros(hi - lo, bool)
        for s, e in ranges:
            covered[s - lo:e - lo] = True
        if not covered.all():
            raise ValueError(f"process {proc} holds non-contiguous batch rows {sorted(ranges)}")
        spans[proc] = (lo, hi)
    sizes = {hi - lo for lo, hi in spans.values()}
    distinct = sorted(set(spans.values()))
    if len(sizes) != 1 or sum(hi - lo for lo, hi in distinct) != b or any(
            a[1] != c[0] for a, c in zip(distinct, distinct[1:])):
        raise ValueError(f"processes hold overlapping or unequal batch rows: {spans}")
    size = sizes.pop()
    lo, _ = spans[jax.process_index()]
    return lo // size, b // size


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding,
                 global_shape: Sequence[int]) -> dict[str, jax.Array]:
    """This process's rows -> global jax.Arrays (jax.make_array_from_process_local_data)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), tuple(global_shape))
            for k, v in local.items()}


# -- activations ---------------------------------------------------------------------------
def activation_interceptor(mesh: Mesh, rules: Rules) -> Callable[..., Any]:
    """A flax method interceptor pinning the residual stream (every Block's output and the
    embeddings) to (batch, -, -): batch-split activations, as maxtext's activation rules do.

    Without it XLA may carry the params' fsdp split of D into the activations and then
    reshard them (an "involuntary full rematerialization"). Use with nn.intercept_methods.
    """
    from kronjax.model import Block

    def constrain(x: Any) -> Any:
        if not isinstance(x, jax.Array) or x.ndim != 3:
            return x
        sh = logical_sharding((BATCH, None, None), x.shape, mesh, rules, "activations")
        return jax.lax.with_sharding_constraint(x, sh)

    def interceptor(next_fun: Callable[..., Any], args: Any, kwargs: Any, context: Any) -> Any:
        if isinstance(context.module, AttentionCore) and context.method_name == "__call__":
            return _attention_per_shard(next_fun, args, kwargs, mesh, rules)
        out = next_fun(*args, **kwargs)
        if (context.method_name == "__call__" and isinstance(context.module, Block)) or (
                context.method_name == "embed" and isinstance(context.module, GPT)):
            return constrain(out)
        return out

    return interceptor


def _attention_per_shard(core: Callable[..., Any], args: Any, kwargs: Any, mesh: Mesh,
                         rules: Rules) -> Any:
    """An accelerator's fused attention kernel on each device's sequences and heads
    (shard_map: XLA cannot partition a Pallas call). CPU meshes, and attention with dropout
    (the reference), are left to XLA's partitioner as before."""
    dropout = args[3] if len(args) > 3 else kwargs.get("dropout")
    if mesh.devices.flat[0].platform == "cpu" or mesh.size == 1 or dropout is not None:
        return core(*args, **kwargs)
    spec = logical_sharding((BATCH, None, "heads", "kv"), args[0].shape, mesh, rules,
                            "attention").spec
    return jax.shard_map(lambda q, k, v: core(q, k, v), mesh=mesh, in_specs=(spec,) * 3,
                         out_specs=spec, check_vma=False)(*args[:3])


# -- the loss on the mesh (its formulas are kronjax.loss's) ------------------------------------
def vocab_parallel_cross_entropy(mesh: Mesh, rules: Rules) -> Callable[[jax.Array, jax.Array],
                                                                       jax.Array]:
    """Mean next-token loss with logits split over the vocabulary's mesh axes (shard_map).

    Each device sees B_local x T x V/n logits and never gathers the V axis: a max, a sum of
    exponentials and the target's logit are combined with one pmax and two psums. Falls back
    to `cross_entropy` where the vocabulary is not split (or V does not divide).
    """

    def ce(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
        b, t, v = logits_BxTxV.shape
        spec = logical_sharding((BATCH, None, "vocab"), (b, t, v), mesh, rules, "logits").spec
        vocab_axes = _axes_tuple(spec[2])
        if not vocab_axes or math.prod(mesh.shape[a] for a in vocab_axes) == 1:
            return cross_entropy(logits_BxTxV, targets_BxT)
        fn = jax.shard_map(lambda lg, tg: vocab_parallel_losses(lg, tg, vocab_axes), mesh=mesh,
                           in_specs=(spec, P(spec[0], None)), out_specs=P(spec[0], None))
        return fn(logits_BxTxV, targets_BxT).mean()

    return ce


def constrained_cross_entropy(mesh: Mesh, rules: Rules) -> Callable[[jax.Array, jax.Array],
                                                                    jax.Array]:
    """`cross_entropy` with the logits pinned to (batch, -, vocab) for XLA to partition."""

    def ce(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
        sh = logical_sharding((BATCH, None, "vocab"), logits_BxTxV.shape, mesh, rules, "logits")
        return cross_entropy(jax.lax.with_sharding_constraint(logits_BxTxV, sh), targets_BxT)

    return ce


def cross_entropy_for(mesh: Mesh, rules: Rules, vocab_parallel: bool) -> Callable[
        [jax.Array, jax.Array], jax.Array]:
    return (vocab_parallel_cross_entropy if vocab_parallel else constrained_cross_entropy)(
        mesh, rules)


def describe(mesh: Mesh) -> str:
    kind = mesh.devices.flat[0].platform
    return (", ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)
            + f" ({mesh.devices.size} {kind} devices, {jax.process_count()} process(es))")
