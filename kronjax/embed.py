"""KroneckerEmbed: a Flax linen drop-in for `nn.Embed` whose only parameter is W (C x D).

The codec (byte rows, lengths, or the dense V x C table) is a constant of the module, never
a variable: it stays out of the params tree, the optimizer, weight decay and checkpoints.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kronjax import codec
from kronjax.vocab import ByteVocab, encode_bytes

Mode = Literal["sparse", "dense", "bytes"]
MODES = ("sparse", "dense", "bytes")


@functools.lru_cache(maxsize=4)
def _dense_table(vocab: ByteVocab) -> np.ndarray:
    """The V x C constant for mode="dense", built once per vocabulary (it can be large).

    Built eagerly even when first needed inside a jit trace: it is a constant of the model.
    """
    with jax.ensure_compile_time_eval():
        return codec.codec_table(vocab.rows, vocab.lengths)


def _check_concrete_bytes(rows_NxP: Any, lengths_N: Any, pos_dim: int) -> None:
    """ValueError naming the first row out of range; nothing for tracers (values unknown)."""
    if isinstance(rows_NxP, jax.core.Tracer) or isinstance(lengths_N, jax.core.Tracer):
        return
    lengths, rows = np.asarray(lengths_N).reshape(-1), np.asarray(rows_NxP)
    bad = np.flatnonzero((lengths < 0) | (lengths > pos_dim))
    if bad.size:
        raise ValueError(f"byte lengths must lie in [0, pos_dim={pos_dim}]; row {bad[0]} has "
                         f"length {lengths[bad[0]]}")
    if not np.issubdtype(rows.dtype, np.uint8):
        where = np.argwhere((rows < 0) | (rows > 255))
        if where.size:
            raise ValueError(f"byte values must lie in 0..255; row {where[0][0]} holds "
                             f"{rows[tuple(where[0])]} at position {where[0][-1]}")


class ByteOverride(NamedTuple):
    """Bytes that replace some positions' tokens: a pytree, so it passes through jax.jit.

    Where mask is true, that position embeds the given bytes instead of its token: a word
    with no single token can be placed at any position (forced out-of-vocabulary).
    """

    rows: Any     # (..., P) uint8
    lengths: Any  # (...,) int
    mask: Any     # (...,) bool

    @classmethod
    def single(cls, ids_shape: tuple[int, ...], position: tuple[int, ...], word: bytes,
               pos_dim: int) -> ByteOverride:
        """Override one position (a tuple index into ids) with `word`'s bytes."""
        rows_1xP, len_1 = encode_bytes([word], pos_dim)
        rows = np.zeros(ids_shape + (pos_dim,), np.uint8)
        lengths = np.zeros(ids_shape, np.int32)
        mask = np.zeros(ids_shape, bool)
        rows[position] = rows_1xP[0]
        lengths[position] = len_1[0]
        mask[position] = True
        return cls(rows, lengths, mask)


class KroneckerEmbed(nn.Module):
    """Embeds ids through the fixed Kronecker codec and one learned projection.

    Attributes:
      vocab: the ByteVocab giving each id's bytes (pad it to the model's vocabulary size).
      features: d_model.
      mode: "sparse" (closed form, default), "dense" (precomputed V x C table) or
        "bytes" (recompute the codec from byte rows, the paper's runtime variant).
      dtype: compute dtype of the output; param_dtype: dtype of W.
      gpu_codec: the sparse mode's formulation on CUDA GPUs (`codec.GPU_FORMS`, or "auto");
        no other platform reads it.
    """

    vocab: ByteVocab
    features: int
    mode: Mode = "sparse"
    dtype: Any | None = None
    param_dtype: Any = jnp.float32
    embedding_init: nn.initializers.Initializer | None = None
    gpu_codec: str = "auto"

    def setup(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {self.mode!r}")
        codec.resolve_gpu_form(self.gpu_codec)
        d = self.vocab.codec_dim
        init = self.embedding_init or nn.initializers.normal(stddev=1.0 / np.sqrt(d))
        self.projection = self.param(
            "projection", nn.with_logical_partitioning(init, ("codec", "embed")),
            (d, self.features), self.param_dtype)

    @property
    def num_embeddings(self) -> int:
        return self.vocab.vocab_size

    def _rows(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        rows = jnp.asarray(self.vocab.rows)[ids]
        lengths = jnp.asarray(self.vocab.lengths, jnp.int32)[ids]
        return rows, lengths

    def _embed_rows(self, rows_NxP: jax.Array, lengths_N: jax.Array,
                    valid_N: jax.Array | None = None) -> jax.Array:
        """Rows -> (N, D); where valid_N is false, NaN (fused into the sparse kernel)."""
        w = jnp.asarray(self.projection)
        if self.mode == "bytes":
            z = codec.codec_vectors(rows_NxP, lengths_N)
            out = z @ w.astype(jnp.float32)
            return out if valid_N is None else jnp.where(valid_N[:, None], out, jnp.nan)
        return codec.closed_form(w, rows_NxP, lengths_N, valid_N=valid_N, gpu=self.gpu_codec)

    def __call__(self, ids: jax.Array, override: ByteOverride | None = None) -> jax.Array:
        """ids (...) int -> (..., features). `override` swaps chosen positions' bytes."""
        ids = jnp.asarray(ids)
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"KroneckerEmbed takes integer ids; got {ids.dtype}")
        flat = ids.reshape(-1)
        # Ids outside the vocabulary embed to NaN, as nn.Embed's lookup does, rather than
        # silently reading a clamped row (an unpadded vocabulary would train on wrong input).
        in_range = (flat >= 0) & (flat < self.vocab.vocab_size)
        if self.mode == "sparse" and override is None:
            # the kernel gathers each block's byte rows itself and applies the NaN mask in
            # its loops: no (N, P) rows, no extra (N, D) pass or buffer
            out = codec.closed_form(jnp.asarray(self.projection), self.vocab.rows,
                                    self.vocab.lengths, ids_N=flat, gpu=self.gpu_codec)
        elif self.mode == "dense" and override is None:
            table_VxD = jnp.asarray(_dense_table(self.vocab))
            out = table_VxD[flat] @ jnp.asarray(self.projection).astype(jnp.float32)
            out = jnp.where(in_range[:, None], out, jnp.nan)
        else:
            rows, lengths = self._rows(flat)
            if override is not None:
                o_rows, o_len, o_mask = (jnp.asarray(a) for a in tuple(override))
                mask = o_mask.reshape(-1)
                rows = jnp.where(mask[:, None], o_rows.reshape(-1, rows.shape[-1]), rows)
                lengths = jnp.where(mask, o_len.reshape(-1).astype(jnp.int32), lengths)
            out = self._embed_rows(rows, lengths, in_range)
        return out.reshape(ids.shape + (self.features,)).astype(self.dtype or jnp.float32)

    def embed_bytes(self, rows_NxP: jax.Array, lengths_N: jax.Array) -> jax.Array:
        """Embeddings of arbitrary byte rows (see `vocab.encode_bytes`), batched: (N, D).

        Lengths must lie in [0, pos_dim] and byte values in 0..255: outside them the sparse and
        bytes modes gather different (clamped or dropped) rows and silently disagree. Concrete
        inputs are checked here (ValueError); traced ones (under jit) cannot be and are not:
        build them with `vocab.encode_bytes`, which truncates and stores uint8.
        """
        if rows_NxP.shape[-1] != self.vocab.pos_dim:
            raise ValueError(f"byte rows must have pos_dim={self.vocab.pos_dim} columns; "
                             f"got {rows_NxP.shape}")
        _check_concrete_bytes(rows_NxP, lengths_N, self.vocab.pos_dim)
        out = self._embed_rows(jnp.asarray(rows_NxP), jnp.asarray(lengths_N, jnp.int32))
        return out.astype(self.dtype or jnp.float32)

    def table(self) -> jax.Array:
        """The codec-generated V x D table K @ W, computed by the closed form (no V x C)."""
        if self.mode == "dense":
            return jnp.asarray(_dense_table(self.vocab)) @ jnp.asarray(self.projection)
        return self._embed_rows(jnp.asarray(self.vocab.rows),
                                jnp.asarray(self.vocab.lengths, jnp.int32))

    def attend(self, query: jax.Array) -> jax.Array:
        """Logits of query (..., D) against the codec-generated table: the tied output head."""
        dtype = self.dtype or jnp.float32
        return jnp.dot(query.astype(dtype), self.table().astype(dtype).T)
