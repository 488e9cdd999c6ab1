"""Checksums of a pytree of arrays, computed where the arrays live.

A checkpoint records, for every leaf of the state, two 32-bit sums of the leaf's bytes read
as unsigned words: one weighted by position (each word times 2i+1, so any single flipped bit
changes it, whatever the word) and one plain. Integer sums wrap modulo 2**32 and do not
depend on the order they are added in, so they come out the same on any device, mesh or
number of processes: they run jitted on the arrays' own devices (no copy to the host, sharded
arrays included) and only 2 words per leaf come back. `kronjax.checkpoint` saves them beside
the state and compares them after a restore: orbax restores a flipped bit in an array file
without complaint.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ALGORITHM", "mismatches", "nonfinite_leaves", "tree_checksums"]

ALGORITHM = "sum32x2-v1"  # recorded with the sums; another value is not compared


def _words(x: jax.Array) -> jax.Array:
    """x's bytes as a flat uint32 vector (1- and 2-byte words widened, 8-byte ones split)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


def _sums(leaves: list[jax.Array]) -> jax.Array:
    rows = []
    for x in leaves:
        w = _words(x)
        i = jax.lax.iota(jnp.uint32, w.shape[0])
        rows.append(jnp.stack([jnp.sum(w * (2 * i + 1), dtype=jnp.uint32),
                               jnp.sum(w, dtype=jnp.uint32)]))
    return jnp.stack(rows) if rows else jnp.zeros((0, 2), jnp.uint32)


_sums_jit = jax.jit(_sums)


def _host(x: jax.Array) -> np.ndarray:
    """A small result as NumPy, gathered from every process where it spans several."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def tree_checksums(tree: Any) -> dict[str, Any]:
    """{"algorithm", "leaves": {path: [dtype, shape, weighted sum, plain sum]}} of tree's
    array leaves (a collective under jax.distributed: every process calls it)."""
    flat = [(jax.tree_util.keystr(path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if isinstance(leaf, (jax.Array, np.ndarray)) or hasattr(leaf, "dtype")]
    arrays = [jnp.asarray(leaf) if isinstance(leaf, np.ndarray) else leaf for _, leaf in flat]
    sums = _host(_sums_jit(arrays)) if arrays else np.zeros((0, 2), np.uint32)
    return {"algorithm": ALGORITHM,
            "leaves": {name: [str(a.dtype), list(a.shape), int(s[0]), int(s[1])]
                       for (name, _), a, s in zip(flat, arrays, sums, strict=True)}}


def mismatches(tree: Any, recorded: dict[str, Any]) -> list[str]:
    """The leaves of tree whose sums differ from `recorded` (tree_checksums of the saved
    tree), one line each. Leaves restored with another dtype or shape than they were saved
    with cannot be compared and are skipped, as is everything of another ALGORITHM."""
    if recorded.get("algorithm") != ALGORITHM:
        return []
    want, got = recorded.get("leaves", {}), tree_checksums(tree)["leaves"]
    out = []
    for name, (dtype, shape, s1, s2) in got.items():
        if name not in want:
            continue
        w_dtype, w_shape, w1, w2 = want[name]
        if (w_dtype, list(w_shape)) == (dtype, shape) and (w1, w2) != (s1, s2):
            out.append(f"{name} ({dtype}{shape})")
    missing = sorted(set(want) - set(got))
    if missing:
        out.append(f"leaves missing from the restored state: {', '.join(missing[:4])}")
    return out


def _finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


_finite_jit = jax.jit(_finite)


def nonfinite_leaves(tree: Any) -> tuple[list[str], int]:
    """(the paths of tree's floating-point leaves holding a NaN or an inf, how many
    floating-point leaves there are): one reduction per
    leaf on the arrays' own devices, one bool per leaf back (a collective under
    jax.distributed). A diverged state must never be saved as a good checkpoint: the loss
    is computed before the update, so a finite loss can come with non-finite parameters."""
    flat = [(jax.tree_util.keystr(path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)]
    if not flat:
        return [], 0
    arrays = [jnp.asarray(leaf) if isinstance(leaf, np.ndarray) else leaf for _, leaf in flat]
    ok = _host(_finite_jit(arrays))
    return [name for (name, _), good in zip(flat, ok, strict=True) if not good], len(flat)
