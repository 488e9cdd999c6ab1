"""GPT-2 (nanoGPT's model.py) in Flax linen, with the embedding arm chosen by config.

Shape letters, the one table for array names across the package (`ids_BxT`, `x_BxTxD`,
`w_CxD`), the same meaning in every file:
  B batch, T sequence (<= block_size), D model width (n_embd), H heads, K head dim (D / H),
  V vocabulary, F MLP hidden (4 D), P pos_dim, C codec width (256 * P), 256 byte values
  (W viewed as 256 x P x D), A micro-batches per step, N tokens flattened, M tokens in one
  block of the codec's fused loops, Q / S query / key positions in attention, J position
  chunks of the fused head + loss (kronjax.loss) of c positions each, v the slice of V one
  device holds (vocabulary-parallel loss).

Activation shardings: kronjax.mesh.activation_interceptor, installed by the train step
(step.loss_fn's `interceptor`), pins the output of `embed` and of every `Block` to
(batch, -, -) when the model runs on a mesh; the model itself stays mesh-free.

Arms (README "Train"): bpe_tied (nanoGPT), bpe_untied, kron (codec + W, separate head),
kron_tied (logits against the codec-generated table K @ W).

Logical axis names on every param (`LOGICAL_AXES`; the sharding rules map them to mesh axes):
"vocab" V, "embed" D, "codec" C (W's rows, named by KroneckerEmbed), "position" block_size,
"heads" H, "kv" K, "mlp" F, "norm" D (LayerNorm scale/bias), and None for the size-3 q/k/v
selector. The fused qkv kernel is (D, 3, H, K) and the attention output kernel (H, K, D):
nanoGPT's (D, 3D) and (D, D) reshaped, so sharding "heads" splits q, k and v alike.

Params are float32 (param_dtype); activations and matmuls run in config.dtype; attention
softmax and the returned logits are float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kronjax.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from kronjax.attention import AttentionCore
from kronjax.codec import resolve_gpu_form
from kronjax.embed import MODES, ByteOverride, KroneckerEmbed
from kronjax.errors import UserError
from kronjax.layers import INIT_STD, LN_EPS, LayerNorm, Linear, gelu, partitioned
from kronjax.loss import fused_cross_entropy
from kronjax.vocab import ByteVocab

ARMS = ("bpe_tied", "bpe_untied", "kron", "kron_tied")
KRON_TIED_LOGIT_SCALE = INIT_STD  # see GPT._head_operands: bpe_tied's logit scale at init
PER_STEP = "per_step"  # variable collection: values a step computes once (GPT.per_step)
LOGICAL_AXES = ("vocab", "embed", "codec", "position", "heads", "kv", "mlp", "norm")


def _as_dtype(value: Any, field: str) -> jnp.dtype:
    try:
        return jnp.dtype(value)
    except TypeError as e:
        raise ValueError(f"{field} must be a dtype or one of 'float32', 'bfloat16', "
                         f"'float16'; got {value!r}") from e


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Model hyperparameters (nanoGPT's GPTConfig plus the embedding arm)."""

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True
    arm: str = "kron"
    pos_dim: int = 16
    kron_mode: str = "sparse"
    attention: str = "auto"  # kronjax.attention.IMPLEMENTATIONS: "auto" is per platform
    codec_gpu: str = "auto"  # the codec's formulation on CUDA GPUs (kronjax.codec.GPU_FORMS)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if self.arm not in ARMS:
            raise ValueError(f"unknown arm {self.arm!r}; valid arms are {', '.join(ARMS)}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"unknown attention {self.attention!r}; valid: "
                             f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
        resolve_gpu_form(self.codec_gpu)
        if self.kron_mode not in MODES:
            raise ValueError(f"unknown kron_mode {self.kron_mode!r}; valid: {', '.join(MODES)}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "pos_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1); got {self.dropout}")
        object.__setattr__(self, "dtype", _as_dtype(self.dtype, "dtype"))
        object.__setattr__(self, "param_dtype", _as_dtype(self.param_dtype, "param_dtype"))

    @classmethod
    def from_config(cls, model_cfg: Any, vocab_size: int | None = None) -> GPTConfig:
        """From an ml_collections ConfigDict (or mapping) with this class's field names.

        `vocab_size`, when given, wins over the config's (the data decides it).
        """
        d = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
        fields = dataclasses.fields(cls)
        names = [f.name for f in fields]
        if unknown := sorted(set(d) - set(names)):
            raise ValueError(f"unknown model config keys {unknown}; valid keys: {names}")
        d.update({} if vocab_size is None else {"vocab_size": vocab_size})
        required = [f.name for f in fields if f.default is dataclasses.MISSING]
        if missing := [n for n in required if n not in d]:
            raise ValueError(f"model config lacks required keys {missing}")
        return cls(**d)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def is_kron(self) -> bool:
        return self.arm.startswith("kron")

    def require_kron(self, what: str = "a byte override") -> None:
        """The one refusal of what only the codec can do (embed a word from its bytes)."""
        if not self.is_kron:
            raise UserError(f"{what} needs a Kronecker arm (a kron arm: kron or kron_tied); "
                            f"this run's arm is {self.arm}")

    @property
    def is_tied(self) -> bool:
        return self.arm in ("bpe_tied", "kron_tied")

    @property
    def has_per_step(self) -> bool:
        """Whether GPT.per_step has values (kron_tied's codec table)."""
        return self.arm == "kron_tied"


def _layer_norm(c: GPTConfig, name: str) -> LayerNorm:
    return LayerNorm(epsilon=LN_EPS, use_bias=c.bias, dtype=c.dtype, param_dtype=c.param_dtype,
                     name=name)


class CausalSelfAttention(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, train: bool) -> jax.Array:
        c = self.config
        h, k, d = c.n_head, c.head_dim, c.n_embd
        kw = dict(use_bias=c.bias, dtype=c.dtype, param_dtype=c.param_dtype)
        qkv_BxTx3xHxK = Linear((d,), (3, h, k), ("embed", None, "heads", "kv"), name="c_attn",
                               **kw)(x_BxTxD)
        q, key, v = (qkv_BxTx3xHxK[:, :, i] for i in range(3))
        attn_drop = (nn.Dropout(c.dropout, deterministic=False) if train and c.dropout > 0
                     else None)
        y_BxTxHxK = AttentionCore(c.dtype, c.attention, name="attend")(q, key, v, attn_drop)
        y_BxTxD = Linear((h, k), (d,), ("heads", "kv", "embed"), name="c_proj",
                         std=INIT_STD / math.sqrt(2 * c.n_layer), **kw)(y_BxTxHxK)
        return nn.Dropout(c.dropout, deterministic=not train)(y_BxTxD)


class MLP(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, train: bool) -> jax.Array:
        c = self.config
        d, f = c.n_embd, 4 * c.n_embd
        kw = dict(use_bias=c.bias, dtype=c.dtype, param_dtype=c.param_dtype)
        h_BxTxF = Linear((d,), (f,), ("embed", "mlp"), name="c_fc", **kw)(x_BxTxD)
        h_BxTxF = gelu(h_BxTxF)
        y_BxTxD = Linear((f,), (d,), ("mlp", "embed"), name="c_proj",
                         std=INIT_STD / math.sqrt(2 * c.n_layer), **kw)(h_BxTxF)
        return nn.Dropout(c.dropout, deterministic=not train)(y_BxTxD)


class Block(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, train: bool) -> jax.Array:
        c = self.config
        attn = CausalSelfAttention(c, name="attn")
        x_BxTxD = x_BxTxD + attn(_layer_norm(c, "ln_1")(x_BxTxD), train)
        return x_BxTxD + MLP(c, name="mlp")(_layer_norm(c, "ln_2")(x_BxTxD), train)


def _lookup(table_VxD: jax.Array, ids: jax.Array) -> jax.Array:
    """table[ids], NaN rows for ids outside [0, V) (as nn.Embed and KroneckerEmbed give)."""
    v = table_VxD.shape[0]
    in_range = (ids >= 0) & (ids < v)
    rows = table_VxD.at[jnp.where(in_range, ids, 0)].get(mode="promise_in_bounds")
    return jnp.where(in_range[..., None], rows, jnp.nan)


def _attend(h_BxTxD: jax.Array, table_VxD: jax.Array, dtype: Any) -> jax.Array:
    """Tied-head logits h @ table^T as one 2-D matmul in `dtype` (see Linear for why 2-D)."""
    d = h_BxTxD.shape[-1]
    logits_NxV = jnp.dot(h_BxTxD.reshape((-1, d)).astype(dtype), table_VxD.astype(dtype).T)
    return logits_NxV.reshape(h_BxTxD.shape[:-1] + (table_VxD.shape[0],))


class GPT(nn.Module):
    """nanoGPT's GPT-2. `vocab` (padded to config.vocab_size) is required by the kron arms.

    `embed` and `from_embeddings` split `__call__` so probes and tests can differentiate
    with respect to the embedded input: `model.apply(v, x, method=GPT.from_embeddings)`.
    """

    config: GPTConfig
    vocab: ByteVocab | None = None

    def setup(self) -> None:
        c = self.config
        emb_init = partitioned(nn.initializers.normal(INIT_STD), ("vocab", "embed"))
        if c.is_kron:
            if self.vocab is None:
                raise ValueError(f"arm {c.arm!r} needs a ByteVocab (vocab=...)")
            if self.vocab.vocab_size != c.vocab_size:
                raise ValueError(f"vocab has {self.vocab.vocab_size} ids but config.vocab_size is "
                                 f"{c.vocab_size}; pass vocab.pad_to({c.vocab_size})")
            if self.vocab.pos_dim != c.pos_dim:
                raise ValueError(f"vocab has pos_dim={self.vocab.pos_dim} but config.pos_dim is "
                                 f"{c.pos_dim}")
            self.kron = KroneckerEmbed(self.vocab, c.n_embd, mode=c.kron_mode, dtype=c.dtype,
                                       param_dtype=c.param_dtype, gpu_codec=c.codec_gpu)
        else:
            self.wte = nn.Embed(c.vocab_size, c.n_embd, embedding_init=emb_init, dtype=c.dtype,
                                param_dtype=c.param_dtype)
        self.wpe = nn.Embed(c.block_size, c.n_embd, dtype=c.dtype, param_dtype=c.param_dtype,
                            embedding_init=partitioned(nn.initializers.normal(INIT_STD),
                                                        ("position", "embed")))
        self.drop = nn.Dropout(c.dropout)
        self.h = [Block(c) for _ in range(c.n_layer)]
        self.ln_f = _layer_norm(c, "ln_f")
        if not c.is_tied:
            self.lm_head = Linear((c.n_embd,), (c.vocab_size,), ("embed", "vocab"),
                                  use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype)

    # kron_tied's codec table K @ W is a function of W alone, used by the input side and the
    # head. One forward computes it once (`_shared_table`) and hands it to the private
    # helpers; a train step with several micro-batches computes it once per step instead:
    # `per_step` gives it, and the step passes it back as the PER_STEP variable collection.
    def per_step(self) -> dict[str, jax.Array]:
        """What a step may compute once from the params and share across its micro-batches:
        {"table_VxD": K @ W} for kron_tied, nothing for the other arms. Pass it back as
        `model.apply({"params": p, PER_STEP: values}, ...)`."""
        return {"table_VxD": self.tied_table()} if self.config.has_per_step else {}

    def tied_table(self) -> jax.Array:
        """kron_tied: the codec table K @ W (V x D, float32), by the closed form."""
        if self.config.arm != "kron_tied":
            raise ValueError(f"only kron_tied has a codec-generated table; arm is "
                             f"{self.config.arm!r}")
        return self.kron.table()

    def _given_table(self) -> jax.Array | None:
        """The PER_STEP table when the caller passed one (kron_tied), else None."""
        if self.config.has_per_step and self.has_variable(PER_STEP, "table_VxD"):
            return self.get_variable(PER_STEP, "table_VxD")
        return None

    def _shared_table(self) -> jax.Array | None:
        """kron_tied: the given table or K @ W computed now, shared by input and head."""
        given = self._given_table()
        if given is not None or not self.config.has_per_step:
            return given
        return self.tied_table()

    def embed(self, ids_BxT: jax.Array, *, train: bool = False,
              override: ByteOverride | None = None) -> jax.Array:
        """Token + position embeddings, then dropout: x_BxTxD in the compute dtype."""
        return self._embed(ids_BxT, train, override, self._given_table())

    def _embed(self, ids_BxT: jax.Array, train: bool, override: ByteOverride | None,
               table_VxD: jax.Array | None) -> jax.Array:
        """`embed`; with kron_tied's table at hand, token rows are looked up in it."""
        c = self.config
        t = ids_BxT.shape[-1]
        if t > c.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {c.block_size}")
        if c.is_kron and table_VxD is not None and override is None:
            # kron_tied: the head computes the codec table K @ W anyway; looking its rows
            # up is the same numbers as the per-token closed form, and the codec's work
            # (forward and its scatter-add backward) is done once per step, not twice.
            tok_BxTxD = _lookup(table_VxD, ids_BxT).astype(c.dtype)
        elif c.is_kron:
            tok_BxTxD = self.kron(ids_BxT, override=override)
        else:
            if override is not None:
                c.require_kron()
            tok_BxTxD = self.wte(ids_BxT)
        x_BxTxD = tok_BxTxD.astype(c.dtype) + self.wpe(jnp.arange(t))
        return self.drop(x_BxTxD, deterministic=not train)

    def from_embeddings(self, x_BxTxD: jax.Array, *, train: bool = False,
                        return_hidden: bool = False) -> Any:
        """Blocks, final LayerNorm and head on embedded input; see `__call__` for the result."""
        return self._from_embeddings(x_BxTxD, train, return_hidden, self._shared_table())

    def _from_embeddings(self, x_BxTxD: jax.Array, train: bool, return_hidden: bool,
                         table_VxD: jax.Array | None) -> Any:
        h_BxTxD, blocks = self._trunk(x_BxTxD, train)
        logits_BxTxV = self._head(h_BxTxD, table_VxD)
        if return_hidden:
            return {"logits": logits_BxTxV, "hidden": h_BxTxD, "blocks": blocks}
        return logits_BxTxV

    def _trunk(self, x_BxTxD: jax.Array, train: bool) -> tuple[jax.Array, list[jax.Array]]:
        """The blocks, then the final LayerNorm: (hidden BxTxD, each block's output)."""
        blocks = []
        for block in self.h:
            x_BxTxD = block(x_BxTxD, train)
            blocks.append(x_BxTxD)
        return self.ln_f(x_BxTxD), blocks

    def head(self, h_BxTxD: jax.Array) -> jax.Array:
        """Output logits (float32) from final-LN hidden states, per arm."""
        return self._head(h_BxTxD, self._shared_table())

    def _head(self, h_BxTxD: jax.Array, table_VxD: jax.Array | None) -> jax.Array:
        if self.config.is_tied:
            h_BxTxD, w_VxD, _ = self._head_operands(h_BxTxD, table_VxD)
            logits = _attend(h_BxTxD, w_VxD, self.config.dtype)
        else:
            logits = self.lm_head(h_BxTxD)
        return logits.astype(jnp.float32)

    def __call__(self, ids_BxT: jax.Array, *, train: bool = False,
                 override: ByteOverride | None = None, return_hidden: bool = False) -> Any:
        """ids_BxT -> logits_BxTxV (float32).

        With return_hidden: {"logits", "hidden": final-LN states BxTxD, "blocks": the n_layer
        block outputs BxTxD (residual stream, before ln_f)}, hidden states in compute dtype.
        Dropout (train=True) draws from the "dropout" rng.
        """
        table_VxD = self._shared_table()
        x_BxTxD = self._embed(ids_BxT, train, override, table_VxD)
        return self._from_embeddings(x_BxTxD, train, return_hidden, table_VxD)

    def _head_weight(self, table_VxD: jax.Array | None) -> tuple[jax.Array, bool]:
        """The head's matrix and whether it is vocabulary-major: (V, D) tied tables (kron_tied:
        the codec table, before `_head_operands`' logit factor), else the (D, V) lm_head
        kernel."""
        arm = self.config.arm
        if arm == "bpe_tied":
            return self.wte.embedding, True
        if arm == "kron_tied":
            return table_VxD, True
        if self.is_initializing():  # create lm_head's kernel
            self.lm_head(jnp.zeros((1, self.config.n_embd), self.config.dtype))
        return nn.meta.unbox(self.lm_head.variables["params"]["kernel"]), False

    def loss(self, ids_BxT: jax.Array, targets_BxT: jax.Array, *, train: bool = False,
             chunk_tokens: int = 512) -> jax.Array:
        """Mean next-token loss (nats, float32) with the head and cross-entropy fused in chunks
        of about chunk_tokens tokens (kronjax.loss): the same value and gradients as
        kronjax.loss.cross_entropy(self(ids), targets), without the B x T x V logits."""
        table_VxD = self._shared_table()
        x_BxTxD = self._embed(ids_BxT, train, None, table_VxD)
        h_BxTxD, _ = self._trunk(x_BxTxD, train)
        h_BxTxD, w, vocab_major = self._head_operands(h_BxTxD, table_VxD)
        return fused_cross_entropy(h_BxTxD, w, targets_BxT, vocab_major=vocab_major,
                                   chunk_tokens=chunk_tokens, dtype=self.config.dtype)

    def _head_operands(self, h_BxTxD: jax.Array, table_VxD: jax.Array | None
                       ) -> tuple[jax.Array, jax.Array, bool]:
        """(h, head matrix, vocabulary-major) for the logits h @ W: `_head_weight`, with
        kron_tied's fixed logit factor on the smaller of h (N x D) and the table (V x D).

        K @ W has unit-scale entries (z rows have norm sqrt(C), W std 1/sqrt(C)), 50x
        nanoGPT's 0.02 table: KRON_TIED_LOGIT_SCALE gives the tied baseline's logit scale at
        init. Scaling an operand, not the N x V logits, saves a pass over the logits; h is
        usually the smaller (a micro-batch of 8 x 1024 tokens against 50,304 rows), and a
        scaled table would be another V x D pass per micro-batch, forward and backward.
        """
        w, vocab_major = self._head_weight(table_VxD)
        if self.config.arm != "kron_tied":
            return h_BxTxD, w, vocab_major
        if h_BxTxD.size <= w.size:
            return h_BxTxD * jnp.asarray(KRON_TIED_LOGIT_SCALE, h_BxTxD.dtype), w, vocab_major
        return h_BxTxD, w * KRON_TIED_LOGIT_SCALE, vocab_major


def _size(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(tree))))


def _params(params: Mapping[str, Any]) -> Mapping[str, Any]:
    return params["params"] if "params" in params else params


def param_counts(params: Mapping[str, Any], config: GPTConfig) -> dict[str, int]:
    """{input_side, head, rest, total}: input_side is the table (bpe) or projection W (kron),
    head the separate output head (0 when tied), rest everything else (wpe included).

    Works on real params, boxed (Partitioned) params or `jax.eval_shape` structs.
    """
    p = _params(params)
    input_side = _size(p["kron" if config.is_kron else "wte"])
    head = 0 if config.is_tied else _size(p["lm_head"])
    total = _size(p)
    return {"input_side": input_side, "head": head, "rest": total - input_side - head,
            "total": total}


def n_params_nonembedding(params: Mapping[str, Any], config: GPTConfig) -> int:
    """N for the 6N flops-per-token estimate: the params that take part in matmuls.

    As nanoGPT's get_num_params(non_embedding=True): position embeddings are excluded and the
    output head counts once as V x D. Here that holds for every arm, so equal compute gives
    equal N: the input side (a lookup / a P-row gather) is excluded, and the tied kron head
    counts as the V x D matmul it performs, not as its C x D parameters.
    """
    counts = param_counts(params, config)
    wpe = _size(_params(params)["wpe"])
    return counts["rest"] - wpe + config.vocab_size * config.n_embd


def flops_per_token(config: GPTConfig, n_params: int, seq_len: int | None = None) -> int:
    """Training flops per token, nanoGPT / PaLM appendix B: 6 N + 12 n_layer H K T.

    6N covers forward and backward matmuls through the weights (N: n_params_nonembedding);
    the second term is attention's score and value matmuls, which carry no parameters. The
    one formula of the package: the loop's MFU and the benchmarks' use it.
    """
    t = config.block_size if seq_len is None else seq_len
    if n_params < 0 or t < 0:
        raise ValueError(f"n_params and seq_len must be >= 0; got {n_params}, {t}")
    return 6 * n_params + 12 * config.n_layer * config.n_head * config.head_dim * t
