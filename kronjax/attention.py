"""Causal self-attention chosen per platform: the CPU-tuned reference, or a fused kernel.

`layers.causal_attention` (the reference) materialises float32 scores B x H x T x T per
layer and keeps them for the backward: fast on XLA:CPU, but on an accelerator most of the
step's memory. Accelerators get a fused kernel that keeps only q, k, v, the output and a
per-row log-sum-exp, and recomputes the scores in its backward:

  tpu   Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention), causal
        mask, blocks of up to 512 positions; where T is not a multiple of 128 the reference.
  cuda  cuDNN flash attention through jax.nn.dot_product_attention, for bfloat16/float16
        and head dims cuDNN takes; otherwise the reference. Only where this process sees a
        GPU: cuDNN cannot even be traced without one, and no GPU step is compiled elsewhere.
        (Its BTNH layout needs no transposes: jax gives the cuDNN call an output layout that
        makes the transpose back to BxTxHxK a bitcast.)
  cpu   the reference, unchanged.

implementation names the choice: "auto" (the above), "reference" everywhere, or one kernel:
"splash" (TPU), "cudnn" or "pallas_triton" (CUDA: Pallas' Triton flash attention,
jax.experimental.pallas.ops.gpu.attention, forward and backward kernels), each on its own
platform where it takes the shape, and the reference elsewhere. Pallas' Mosaic GPU kernel for
Hopper (attention_mgpu) is not offered: up to jax 0.11 its causal backward raises
NotImplementedError; `python -m kronjax.bench attention` times its forward alone.

The choice is made by `lax.platform_dependent` (as the codec's block size is), so a step
compiled ahead of time for a TPU on a CPU host gets the TPU kernel. Dropout on the attention
weights (train with dropout > 0) always takes the reference: the fused kernels have none.
Under a mesh the kernels run inside shard_map over batch and heads (kronjax.mesh installs it
through `AttentionCore`), since a Pallas call cannot be partitioned by XLA.

Layouts: q, k, v and the output are BxTxHxK as model.py's table names them; the splash
kernel works on HxTxK per sequence (vmapped over B).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kronjax.layers import causal_attention

KERNELS = {"splash": "tpu", "cudnn": "cuda", "pallas_triton": "cuda"}  # kernel: platform
AUTO = {"tpu": "splash", "cuda": "cudnn"}  # what "auto" runs on each platform
IMPLEMENTATIONS = ("auto", "reference", *KERNELS)
SPLASH_LANE = 128  # splash blocks are multiples of this; T must be one too
SPLASH_MAX_BLOCK = 512
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
TRITON_BLOCK = 128  # Pallas Triton attention: forward blocks of up to 128 positions
TRITON_BWD_BLOCK = 32  # its backward kernels' blocks (Pallas' own defaults)


def splash_supported(t: int) -> bool:
    return t % SPLASH_LANE == 0


def _splash_block(t: int) -> int:
    block = SPLASH_MAX_BLOCK
    while t % block:
        block //= 2
    return block


def _splash_kernel(t: int, h: int, interpret: bool) -> Callable[..., jax.Array]:
    """The splash kernel for h heads of causal T x T attention. Built anew in every trace:
    it holds arrays of its mask tables, which must belong to the trace that uses them."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b = _splash_block(t)
    blocks = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                           block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(h)])
    return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks,
                              interpret=interpret)


def splash_attention(q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxK: jax.Array, *,
                     interpret: bool = False) -> jax.Array:
    """Causal softmax(q k^T / sqrt(K)) v by the Pallas TPU splash kernel: y_BxTxHxK.

    interpret=True runs the same kernel in Pallas' interpreter (any platform; tests)."""
    _, t, h, k = q_BxTxHxK.shape
    kernel = _splash_kernel(t, h, interpret)
    heads_major = [jnp.swapaxes(a, 1, 2) for a in  # BxHxTxK
                   (q_BxTxHxK * jnp.asarray(1.0 / math.sqrt(k), q_BxTxHxK.dtype),
                    k_BxTxHxK, v_BxTxHxK)]
    return jnp.swapaxes(jax.vmap(kernel)(*heads_major), 1, 2)


def cudnn_supported(dtype: Any, k: int) -> bool:
    return jnp.dtype(dtype) in [jnp.dtype(d) for d in CUDNN_DTYPES] and k % 8 == 0 and k <= 128


@functools.lru_cache(maxsize=1)
def gpu_present() -> bool:
    try:
        return bool(jax.devices("cuda"))
    except RuntimeError:
        return False


def cudnn_attention(q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxK: jax.Array
                    ) -> jax.Array:
    """Causal attention by cuDNN's fused flash attention (GPU only)."""
    return jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, is_causal=True,
                                        implementation="cudnn")


def triton_supported(dtype: Any, t: int, k: int) -> bool:
    """Pallas Triton attention: whole blocks of T, half precision (float32 dots would run as
    TF32 on the tensor cores), head dims of 16..256."""
    return (jnp.dtype(dtype) in [jnp.dtype(d) for d in CUDNN_DTYPES]
            and t % min(TRITON_BLOCK, t) == 0 and t % TRITON_BWD_BLOCK == 0 and 16 <= k <= 256)


def triton_attention(q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxK: jax.Array, *,
                     interpret: bool = False, block: int = TRITON_BLOCK,
                     bwd_block: int = TRITON_BWD_BLOCK) -> jax.Array:
    """Causal attention by Pallas' Triton flash attention (forward and backward kernels).

    interpret=True runs the same kernels in Pallas' interpreter (any platform; tests)."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_gpu

    t, k = q_BxTxHxK.shape[1], q_BxTxHxK.shape[-1]
    fwd, bwd = min(block, t), min(bwd_block, t)
    blocks = pallas_gpu.BlockSizes(block_q=fwd, block_k=fwd, block_q_dkv=bwd, block_kv_dkv=bwd,
                                   block_q_dq=bwd, block_kv_dq=bwd)
    return pallas_gpu.mha(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, None, sm_scale=1.0 / math.sqrt(k),
                          causal=True, block_sizes=blocks, interpret=interpret)


def attention(q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxK: jax.Array, dtype: Any,
              dropout: Callable[[jax.Array], jax.Array] | None = None,
              implementation: str = "auto") -> jax.Array:
    """Causal self-attention, y_BxTxHxK in `dtype`: the platform's kernel (module docstring)
    for implementation="auto", the reference everywhere for "reference", a named kernel on
    its platform (the reference elsewhere)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; valid: "
                         f"{', '.join(IMPLEMENTATIONS)}")
    q, k, v = (a.astype(dtype) for a in (q_BxTxHxK, k_BxTxHxK, v_BxTxHxK))

    def reference(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return causal_attention(q, k, v, dtype, *(() if dropout is None else (dropout,)))

    t, head_dim = q.shape[1], q.shape[-1]
    kernels = {"splash": splash_attention, "cudnn": cudnn_attention,
               "pallas_triton": triton_attention}
    branches = {platform: kernels[name] for platform in ("tpu", "cuda")
                if (name := kernel_for(platform, t, head_dim, dtype, implementation,
                                       dropout is not None)) != "reference"}
    if not branches:
        return reference(q, k, v)
    return jax.lax.platform_dependent(q, k, v, default=reference, **branches).astype(dtype)


def kernel_for(platform: str, t: int, head_dim: int, dtype: Any, implementation: str = "auto",
               dropout: bool = False) -> str:
    """Which kernel `attention` runs on `platform` ("cpu", "tpu", "cuda"/"gpu") for this
    shape: a name of KERNELS or "reference" (the dry run reports it)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; valid: "
                         f"{', '.join(IMPLEMENTATIONS)}")
    platform = "cuda" if platform == "gpu" else platform
    name = AUTO.get(platform) if implementation == "auto" else implementation
    if dropout or name not in KERNELS or KERNELS[name] != platform:
        return "reference"
    if platform == "cuda" and not gpu_present():  # GPU kernels are traced only beside a GPU
        return "reference"
    supported = {"splash": lambda: splash_supported(t),
                 "cudnn": lambda: cudnn_supported(dtype, head_dim),
                 "pallas_triton": lambda: triton_supported(dtype, t, head_dim)}[name]()
    return name if supported else "reference"


class AttentionCore(nn.Module):
    """The attention product as its own module, so kronjax.mesh's interceptor can wrap it in
    shard_map (batch and heads split, as the activations are) on an accelerator mesh."""

    dtype: Any
    implementation: str = "auto"

    @nn.compact
    def __call__(self, q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxK: jax.Array,
                 dropout: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
        return attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, self.dtype, dropout,
                         self.implementation)
