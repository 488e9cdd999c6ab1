"""The Kronecker codec: byte rows -> z-normalised codec vectors, three exact ways.

For a token with bytes b_0..b_{L-1} (L <= P = pos_dim), C = 256 * P:

    x = (1/sqrt(L)) * sum_p onehot(b_p * P + p)          (R^C)
    z = (x - mean(x)) / (std(x, ddof=1) + eps)            (eps = 1e-6, on the std)
    e = z @ W                                             (W: C x D)

x has exactly L equal non-zeros at distinct indices, so mean and std depend on L only and

    e = (s * sum_p W[b_p * P + p] - mu * colsum(W)) / (sigma + eps)

with s = 1/sqrt(L), mu = L*s/C, sigma = sqrt((L*s^2 - C*mu^2)/(C-1)). L = 0 gives e = 0.

Three implementations, all exact against the authors' PyTorch package:
- `reference_codec`: the NumPy formula (float64 inside), the independent oracle for tests.
- `codec_vectors`: the dense on-the-fly computation in JAX (the paper's runtime variant).
- `closed_form`: L row gathers and one shared column sum; no V x C table, no N x C intermediate.
  A hand-written VJP, and one formulation per platform (kronjax.codec_kernels): on CPU
  blocked loops (scatter-add into W's (256, P, D) slabs), so that its forward+backward beats
  `nn.Embed`'s (whose gradient is a dense V x D); on TPUs both directions are one matmul
  with the bytes' one-hot (the MXU instead of P gathers); on CUDA GPUs the form named by
  `gpu` (GPU_FORMS; default GPU_DEFAULT: the gathers in one block, and a backward that sorts
  the (token, position) pairs instead of atomically adding into a few hot rows of W).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kronjax import codec_kernels as kernels
from kronjax.codec_kernels import CHAR_DIM, EPS, codec_dim, length_stats

__all__ = ["CHAR_DIM", "EPS", "GPU_DEFAULT", "GPU_FORMS", "closed_form", "codec_dim",
           "codec_table", "codec_vectors", "flat_indices", "length_stats", "reference_codec",
           "resolve_gpu_form"]


def _check_rows(rows_NxP: np.ndarray, lengths_N: np.ndarray) -> None:
    if rows_NxP.ndim != 2:
        raise ValueError(f"byte rows must be (N, pos_dim); got shape {rows_NxP.shape}")
    if lengths_N.shape != rows_NxP.shape[:1]:
        raise ValueError(
            f"lengths must be (N,) = ({rows_NxP.shape[0]},); got shape {lengths_N.shape}")
    pos_dim = rows_NxP.shape[1]
    if lengths_N.size and (lengths_N.min() < 0 or lengths_N.max() > pos_dim):
        raise ValueError(f"lengths must lie in [0, {pos_dim}]; got "
                         f"[{lengths_N.min()}, {lengths_N.max()}]")


def reference_codec(rows_NxP: np.ndarray, lengths_N: np.ndarray, eps: float = EPS) -> np.ndarray:
    """The NumPy formula, term by term (dense x, then z-norm with ddof=1): the test oracle."""
    rows_NxP = np.asarray(rows_NxP)
    lengths_N = np.asarray(lengths_N)
    _check_rows(rows_NxP, lengths_N)
    n, pos_dim = rows_NxP.shape
    d = codec_dim(pos_dim)
    x_NxC = np.zeros((n, d), np.float64)
    for i in range(n):
        length = int(lengths_N[i])
        for p in range(length):
            x_NxC[i, int(rows_NxP[i, p]) * pos_dim + p] += 1.0 / np.sqrt(length)
    mean = x_NxC.mean(axis=1, keepdims=True)
    std = x_NxC.std(axis=1, ddof=1, keepdims=True)
    return ((x_NxC - mean) / (std + eps)).astype(np.float32)


def flat_indices(rows_NxP: jax.Array) -> jax.Array:
    """Index of each (byte, position) pair in the flattened (256, P) codec space."""
    pos_dim = rows_NxP.shape[-1]
    return rows_NxP.astype(jnp.int32) * pos_dim + jnp.arange(pos_dim, dtype=jnp.int32)


def codec_vectors(rows_NxP: jax.Array, lengths_N: jax.Array, eps: float = EPS) -> jax.Array:
    """Dense z-normed codec vectors (N, C) in float32, computed numerically from the bytes.

    This is the paper's on-the-fly variant: build x by one-hot scatter, then take the mean
    and the Bessel-corrected std of each row. It materialises N x C; use it for reference
    and small batches, and `closed_form` for training.
    """
    n, pos_dim = rows_NxP.shape
    d = codec_dim(pos_dim)
    valid_NxP = jnp.arange(pos_dim) < lengths_N[:, None]
    s_N, _, _ = length_stats(lengths_N, pos_dim, eps)
    vals_NxP = jnp.where(valid_NxP, s_N[:, None], 0.0).astype(jnp.float32)
    x_NxC = jnp.zeros((n, d), jnp.float32)
    x_NxC = x_NxC.at[jnp.arange(n)[:, None], flat_indices(rows_NxP)].add(vals_NxP)
    mean = x_NxC.mean(axis=-1, keepdims=True)
    centred = x_NxC - mean
    std = jnp.sqrt(jnp.sum(centred * centred, axis=-1, keepdims=True) / (d - 1))
    return centred / (std + eps)


def codec_table(rows_VxP: np.ndarray, lengths_V: np.ndarray, eps: float = EPS,
                chunk: int = 4096) -> np.ndarray:
    """The (V, C) float32 constant table, built in chunks (V x C can be gigabytes)."""
    rows_VxP = np.asarray(rows_VxP)
    lengths_V = np.asarray(lengths_V)
    _check_rows(rows_VxP, lengths_V)
    fn = jax.jit(lambda r, n: codec_vectors(r, n, eps))
    parts = [np.asarray(fn(rows_VxP[i:i + chunk], lengths_V[i:i + chunk]))
             for i in range(0, rows_VxP.shape[0], chunk)]
    if not parts:
        return np.zeros((0, codec_dim(rows_VxP.shape[1])), np.float32)
    return np.concatenate(parts, axis=0)


_BLOCK = 128  # tokens per block of the fused loops on CPU (a 128 x D block stays in L2);
#              block sizes measured: docs/performance.md. None: all tokens in one block.
_ACCELERATOR_BLOCK: int | None = None  # GPUs: one block, i.e. no sequential loop: XLA
#              fuses the P gathers into one kernel there, and a loop of small blocks would
#              cost a few kernel launches per block.

# The closed form on CUDA GPUs, "forward-backward" (kronjax.codec_kernels):
#   gather-scatter  P gathers / P scatter-adds (atomic adds; contended on the space byte)
#   gather-sorted   P gathers / sort + one sorted scatter (a run of equal rows written once)
#   gather-onehot   P gathers / one-hot matmul, three bf16 products (no atomics)
#   onehot-onehot   one-hot matmuls both ways, three bf16 products each
# "auto" is GPU_DEFAULT. Not yet measured on a GPU (docs/performance.md, GPU section).
GPU_FORMS = ("gather-scatter", "gather-sorted", "gather-onehot", "onehot-onehot")
GPU_DEFAULT = "gather-sorted"


def resolve_gpu_form(form: str) -> str:
    """The GPU form `form` names ("auto": GPU_DEFAULT); ValueError for an unknown one."""
    if form == "auto":
        return GPU_DEFAULT
    if form not in GPU_FORMS:
        raise ValueError(f"unknown GPU codec form {form!r}; valid: auto, {', '.join(GPU_FORMS)}")
    return form


def _check_projection(w_CxD: jax.Array, pos_dim: int) -> None:
    d = w_CxD.shape[0]
    if d != codec_dim(pos_dim):
        raise ValueError(f"projection has {d} rows; pos_dim={pos_dim} needs {codec_dim(pos_dim)}")


def _gpu_kernels(form: str) -> tuple[Any, Any]:
    """(forward, backward) kernels of a GPU form; each takes (x, tokens, eps, normalise)."""
    fwd_name, bwd_name = form.split("-")
    onehot = {"forward": functools.partial(kernels.fwd_onehot, dot=kernels.dot_bf16x3),
              "backward": functools.partial(kernels.bwd_onehot, dot=kernels.dot_bf16x3)}
    fwd = kernels.fwd_blocked if fwd_name == "gather" else onehot["forward"]
    bwd = {"scatter": kernels.bwd_blocked, "sorted": kernels.bwd_sorted,
           "onehot": onehot["backward"]}[bwd_name]
    return fwd, bwd


def _per_platform(x: jax.Array, tokens: Any, blocked: Any, mxu: Any, gpu: Any) -> jax.Array:
    """The kernel of each platform applied to x (W forward, the cotangent backward).

    tokens(block) builds the kernels' Tokens with that block size. CPU: `blocked` with the
    CPU block size; TPU: `mxu`, the one-hot matmul at HIGHEST precision; CUDA: `gpu`, the
    GPU form's kernel, one block; other platforms: `blocked`, one block.

    `lax.platform_dependent`, not the default backend, picks: a step compiled ahead of time
    for another platform (a TPU dry run on a CPU host) gets that platform's variant. Every
    variant computes each token's output from the same terms (the compiled code may round
    them differently, by an ulp); the backward's sums are merely grouped differently.
    """
    def run(kernel: Any, block: int | None) -> Any:
        return lambda: kernel(x, tokens(block))
    return jax.lax.platform_dependent(cpu=run(blocked, _BLOCK), tpu=run(mxu, None),
                                      cuda=run(gpu, _ACCELERATOR_BLOCK),
                                      default=run(blocked, _ACCELERATOR_BLOCK))


def _forward(w_CxD, rows, lengths, ids_N, valid_N, eps, normalise, gpu_form):
    def tokens(block: int | None) -> kernels.Tokens:
        return kernels.Tokens(rows, lengths, ids_N, valid_N, block)

    def bind(kernel: Any) -> Any:
        return lambda w, t: kernel(w, t, eps, normalise)
    return _per_platform(w_CxD, tokens, bind(kernels.fwd_blocked), bind(kernels.fwd_onehot),
                         bind(_gpu_kernels(gpu_form)[0]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _project(w_CxD: jax.Array, rows: jax.Array, lengths: jax.Array, ids_N: jax.Array | None,
             valid_N: jax.Array | None, eps: float, normalise: bool, gpu_form: str
             ) -> jax.Array:
    """The closed form (normalise) or the plain gather-sum, with a hand-written VJP in W."""
    return _forward(w_CxD, rows, lengths, ids_N, valid_N, eps, normalise, gpu_form)


def _project_fwd(w_CxD, rows, lengths, ids_N, valid_N, eps, normalise, gpu_form):
    out = _forward(w_CxD, rows, lengths, ids_N, valid_N, eps, normalise, gpu_form)
    # residuals: the integer inputs only (W is not needed: the map is linear in W)
    return out, (rows, lengths, ids_N, valid_N, jnp.zeros((0,), w_CxD.dtype))


def _project_bwd(eps, normalise, gpu_form, res, ct_NxD):
    rows, lengths, ids_N, valid_N, dtype_tag = res

    def tokens(block: int | None) -> kernels.Tokens:
        return kernels.Tokens(rows, lengths, ids_N, valid_N, block)

    def bind(kernel: Any) -> Any:
        return lambda ct, t: kernel(ct, t, eps, normalise)
    dw = _per_platform(ct_NxD, tokens, bind(kernels.bwd_blocked), bind(kernels.bwd_onehot),
                       bind(_gpu_kernels(gpu_form)[1]))
    return dw.astype(dtype_tag.dtype), None, None, None, None


_project.defvjp(_project_fwd, _project_bwd)


def closed_form(w_CxD: jax.Array, rows_NxP: jax.Array, lengths_N: jax.Array,
                eps: float = EPS, *, valid_N: jax.Array | None = None,
                ids_N: jax.Array | None = None, gpu: str = "auto") -> jax.Array:
    """e = (s * sum_p W[idx_p] - mu * colsum(W)) / (sigma + eps), float32 accumulate.

    Forward and backward are the platform's kernels (module docstring; on CPU fused block
    loops, the backward a scatter-add into W's (256, P, D) slabs plus the shared colsum
    term). It is a `jax.custom_vjp`: reverse mode (grad, vjp) works, forward mode (jvp)
    does not.

    valid_N (optional, bool (N,)): tokens where it is false embed to NaN and get no
    gradient: `jnp.where(valid_N[:, None], e, nan)`, but fused into the loops (a separate
    `where` costs an extra (N, D) pass and buffer in both the forward and the backward).

    ids_N (optional, int (N,)): then rows_NxP and lengths_N are the vocabulary's tables,
    (V, P) and (V,), and token n is id ids_N[n]: each block gathers its own rows inside the
    loop (no (N, P) array), and ids outside [0, V) embed to NaN, as `nn.Embed`'s do.

    gpu: the formulation on CUDA GPUs, one of GPU_FORMS or "auto" (GPU_DEFAULT); no other
    platform reads it.
    """
    gpu_form = resolve_gpu_form(gpu)
    w_CxD, rows_NxP, lengths_N = (jnp.asarray(x) for x in (w_CxD, rows_NxP, lengths_N))
    _check_projection(w_CxD, rows_NxP.shape[-1])
    n = rows_NxP.shape[0]
    if ids_N is not None:
        ids_N = jnp.asarray(ids_N)
        if not jnp.issubdtype(ids_N.dtype, jnp.integer) or ids_N.ndim != 1:
            raise TypeError(f"ids_N must be a 1-D integer array; got {ids_N.dtype}{ids_N.shape}")
        n = ids_N.shape[0]
    if valid_N is not None:
        valid_N = jnp.asarray(valid_N, bool).reshape((n,))
    return _project(w_CxD.astype(jnp.float32), rows_NxP, lengths_N, ids_N, valid_N,
                    float(eps), True, gpu_form)
