"""`python -m kronjax.train --config FILE --workdir DIR [--config.a.b=v ...]`.

config -> data (prepared on first use) -> model and state -> one jitted step -> loop with
evaluation, metrics and orbax checkpoints. Rerunning the same command resumes; SIGTERM saves
and exits 0; a non-finite loss stops with an error and keeps the last good checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kronjax import checkpoint as ckpt
from kronjax import config as config_lib
from kronjax import data as data_lib
from kronjax import metrics as metrics_lib
from kronjax import optim
from kronjax.model import GPT, GPTConfig, cross_entropy, flops_per_token, n_params_nonembedding, param_counts
from kronjax.vocab import ByteVocab

log = logging.getLogger("kronjax.train")
State = dict[str, Any]  # {"step": int32 scalar, "params": pytree, "opt_state": pytree}
Batch = dict[str, jax.Array]


class NonFiniteLossError(RuntimeError):
    """The loss went NaN/inf; the last good checkpoint is kept."""


# -- setup ---------------------------------------------------------------------------------
def data_dir_for(cfg: ml_collections.ConfigDict) -> Path:
    """Where prepared data lives: cfg.data.dir, or a cache path keyed by what defines it."""
    if cfg.data.dir:
        return Path(cfg.data.dir).expanduser()
    name = Path(cfg.data.source).name or cfg.data.source
    tok = cfg.data.tokenizer.replace(":", "_").replace("/", "_")
    size = f"-{cfg.data.sp_vocab_size}" if cfg.data.tokenizer == "sentencepiece" else ""
    root = Path(os.environ.get("KRONJAX_DATA", Path.home() / ".cache" / "kronjax" / "data"))
    return root / f"{name.replace(':', '_').replace('/', '_')}-{tok}{size}"


def ensure_data(cfg: ml_collections.ConfigDict, *, progress: bool) -> Path:
    """Prepare the corpus on first use (idempotent; refuses to clobber other data)."""
    ddir = data_dir_for(cfg)
    if not (ddir / "meta.json").exists():
        log.info("no prepared data in %s: preparing %s", ddir, cfg.data.source)
        data_lib.prepare(cfg.data.source, cfg.data.tokenizer, ddir,
                         sp_vocab_size=cfg.data.sp_vocab_size, progress=progress)
    return ddir


def padded_vocab_size(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def model_config(cfg: ml_collections.ConfigDict, tokenizer_vocab: int) -> GPTConfig:
    fields = cfg.model.to_dict()
    multiple = int(fields.pop("vocab_multiple", 1) or 1)
    return GPTConfig.from_config(fields, padded_vocab_size(tokenizer_vocab, multiple))


def run_meta(cfg: ml_collections.ConfigDict, mcfg: GPTConfig, vocab: ByteVocab | None,
             data_meta: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed (plus the resolved config)."""
    shape = {k: getattr(mcfg, k) for k in ("vocab_size", "block_size", "n_layer", "n_head",
                                            "n_embd", "bias", "pos_dim")}
    return {"arm": mcfg.arm, "model_shape": shape, "tokenizer": data_meta["tokenizer"],
            "tokenizer_fingerprint": data_meta["tokenizer_fingerprint"],
            "vocab_fingerprint": vocab.fingerprint if vocab is not None else None,
            "config": cfg.to_dict()}


def init_state(model: GPT, tx: optax.GradientTransformation, seed: int, seq_len: int) -> State:
    ids = jnp.zeros((1, seq_len), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.key(seed), ids)["params"])
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def input_side(params: Any, arm: str) -> jax.Array:
    """The learned input-side matrix: the V x D table or the C x D Kronecker projection."""
    return params["kron"]["projection"] if arm.startswith("kron") else params["wte"]["embedding"]


# -- the step (pure) -------------------------------------------------------------------------
def loss_fn(params: Any, model: GPT, batch: Batch, rng: jax.Array, train: bool) -> jax.Array:
    logits = model.apply({"params": params}, batch["inputs"], train=train, rngs={"dropout": rng})
    return cross_entropy(logits, batch["targets"])


def train_step(state: State, batch_AxBxT: Batch, rng: jax.Array, *, model: GPT,
               tx: optax.GradientTransformation, schedule: optax.Schedule
               ) -> tuple[State, dict[str, jax.Array]]:
    """One optimizer step over A micro-batches, gradients accumulated by lax.scan."""
    params = state["params"]
    grad_fn = jax.value_and_grad(loss_fn)
    step_rng = jax.random.fold_in(rng, state["step"])
    n_micro = batch_AxBxT["inputs"].shape[0]

    def micro(carry: tuple[Any, jax.Array], xs: tuple[Batch, jax.Array]
              ) -> tuple[tuple[Any, jax.Array], None]:
        grads_acc, loss_acc = carry
        mb, i = xs
        loss, grads = grad_fn(params, model, mb, jax.random.fold_in(step_rng, i), True)
        return (jax.tree.map(jnp.add, grads_acc, grads), loss_acc + loss), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, loss_sum), _ = jax.lax.scan(
        micro, (zeros, jnp.zeros((), jnp.float32)), (batch_AxBxT, jnp.arange(n_micro)))
    grads = jax.tree.map(lambda g: g / n_micro, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    metrics = {"loss": loss_sum / n_micro, "grad_norm": optax.global_norm(grads),
               "lr": schedule(state["step"]),
               "input_norm": jnp.linalg.norm(input_side(new_params, model.config.arm))}
    return {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}, metrics


def eval_step(params: Any, batch: Batch, *, model: GPT) -> jax.Array:
    return loss_fn(params, model, batch, jax.random.key(0), False)


def split_micro(batch: dict[str, np.ndarray], n_micro: int) -> dict[str, np.ndarray]:
    """(B, T) -> (A, B/A, T) for the scan over micro-batches."""
    b = batch["inputs"].shape[0]
    if b % n_micro:
        raise ValueError(f"batch {b} is not divisible by grad_accum {n_micro}")
    return {k: v.reshape((n_micro, b // n_micro) + v.shape[1:]) for k, v in batch.items()}


# -- the loop --------------------------------------------------------------------------------
@dataclasses.dataclass
class RunResult:
    step: int
    last_loss: float
    val_loss: float | None
    val_bpb: float | None
    preempted: bool


def train(cfg: ml_collections.ConfigDict, workdir: str | Path, *,
          stop: Callable[[], bool] | None = None) -> RunResult:
    """Train (or resume) the run in workdir; returns its final numbers.

    `stop` is polled after every step (default: a SIGTERM flag, installed before anything
    else so a signal during setup still ends in a clean save).
    """
    if stop is not None:
        return _train(cfg, Path(workdir), stop)
    flag = ckpt.install_sigterm_handler()
    try:
        return _train(cfg, Path(workdir), flag)
    finally:
        getattr(flag, "uninstall", lambda: None)()


def _train(cfg: ml_collections.ConfigDict, workdir: Path, stop: Callable[[], bool]) -> RunResult:
    workdir.mkdir(parents=True, exist_ok=True)
    progress = bool(cfg.train.progress) and sys.stderr.isatty()
    ddir = ensure_data(cfg, progress=progress)
    data_meta = data_lib.load_meta(ddir)
    tokenizer = data_lib.load_tokenizer_for(ddir)
    mcfg = model_config(cfg, tokenizer.vocab_size)
    vocab = (tokenizer.byte_vocab(mcfg.pos_dim).pad_to(mcfg.vocab_size) if mcfg.is_kron else None)
    model = GPT(mcfg, vocab)
    meta = run_meta(cfg, mcfg, vocab, data_meta)

    seq_len, steps = mcfg.block_size, int(cfg.train.steps)
    train_tokens = data_lib.load_split(ddir, "train", vocab_size=mcfg.vocab_size)
    val_tokens = data_lib.load_split(ddir, "val", vocab_size=mcfg.vocab_size)
    dataset = data_lib.train_dataset(train_tokens, seq_len=seq_len,
                                     global_batch=int(cfg.train.batch_size), seed=int(cfg.seed))
    data_iter = iter(dataset)
    eval_set = data_lib.eval_batches(val_tokens, seq_len=seq_len, batch=int(cfg.train.batch_size),
                                     num_batches=int(cfg.data.eval_batches))
    bytes_per_token = data_meta["splits"]["val"]["bytes"] / max(data_meta["splits"]["val"]["tokens"], 1)

    tx, schedule = optim.from_config(cfg)
    init = functools.partial(init_state, model, tx, int(cfg.seed), seq_len)
    checkpointer = ckpt.Checkpointer(workdir / "checkpoints", save_every=int(cfg.train.checkpoint_every),
                                     max_to_keep=int(cfg.train.keep_checkpoints))
    saved = checkpointer.read_meta()
    if saved is not None:
        ckpt.check_compatible(saved, meta, keys=("arm", "model_shape", "tokenizer_fingerprint",
                                                 "vocab_fingerprint"))
        state, _ = checkpointer.restore(None, jax.eval_shape(init), data_iter)
        log.info("resumed from step %d in %s", int(state["step"]), workdir)
    else:
        state = jax.jit(init)()
    (workdir / "config.json").write_text(config_lib.to_json(cfg))

    counts = param_counts(state["params"], mcfg)
    log.info("params: %s", json.dumps(counts))
    fpt = flops_per_token(mcfg, n_params_nonembedding(state["params"], mcfg))
    peak = metrics_lib.device_peak_flops()
    writer = metrics_lib.MetricsWriter(workdir, is_main=jax.process_index() == 0, total_steps=steps,
                                       progress=progress, initial_step=int(state["step"]))
    if int(state["step"]) == 0:
        writer.write(0, {f"params_{k}": v for k, v in counts.items()})

    step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule),
                      donate_argnums=(0,))
    eval_fn = jax.jit(functools.partial(eval_step, model=model))
    rng = jax.random.key(int(cfg.seed) + 1)
    tokens_per_step = int(cfg.train.batch_size) * seq_len
    step = int(state["step"])
    last_loss, val_loss, val_bpb, preempted = float("nan"), None, None, False
    t_last = time.perf_counter()
    try:
        while step < steps:
            batch = split_micro(next(data_iter), int(cfg.train.grad_accum))
            state, m = step_fn(state, batch, rng)
            step += 1
            m = jax.device_get(m)
            last_loss = float(m["loss"])
            if not math.isfinite(last_loss):
                raise NonFiniteLossError(
                    f"loss is {last_loss} at step {step}; stopping without saving, the last "
                    f"good checkpoint (step {checkpointer.latest_step()}) is kept in {workdir}")
            now = time.perf_counter()
            tok_s = tokens_per_step / max(now - t_last, 1e-9)
            t_last = now
            record = {k: float(v) for k, v in m.items()}
            record["tokens_per_s"] = tok_s
            mfu = metrics_lib.mfu(tok_s, fpt, jax.device_count(), peak) if peak else None
            if mfu is not None:
                record["mfu"] = mfu
            if step % int(cfg.train.eval_every) == 0 or step == steps:
                val_loss = float(np.mean([float(eval_fn(state["params"], b)) for b in eval_set]))
                val_bpb = val_loss / math.log(2) / bytes_per_token
                record.update(val_loss=val_loss, val_bpb=val_bpb)
                t_last = time.perf_counter()  # evaluation time is not training throughput
            writer.write(step, record)
            if stop() or checkpointer.reached_preemption(step):
                checkpointer.save(step, state, data_iter, meta, force=True)
                preempted = True
                log.warning("stop requested: saved step %d, exiting", step)
                break
            checkpointer.save(step, state, data_iter, meta, force=step == steps)
    finally:
        checkpointer.close()
        writer.close()
    return RunResult(step, last_loss, val_loss, val_bpb, preempted)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = config_lib.parse_overrides(argv)
    parser = argparse.ArgumentParser(prog="python -m kronjax.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(config_lib.DEFAULT_CONFIG),
                        help="config file (default: configs/default.py)")
    parser.add_argument("--workdir", default=None,
                        help="run directory (default: runs/<config>_<arm>); rerun to resume")
    args = parser.parse_args(rest)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = config_lib.build_config(args.config, overrides)
    except config_lib.ConfigError as e:
        parser.error(str(e))
    workdir = args.workdir or f"runs/{Path(args.config).stem}_{cfg.model.arm}"
    result = train(cfg, workdir)
    print(json.dumps({"workdir": str(workdir), **dataclasses.asdict(result)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
