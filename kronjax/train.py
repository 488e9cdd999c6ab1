"""`python -m kronjax.train --config FILE --workdir DIR [--config.a.b=v ...] [--dry_run]`.

config -> (multi-host setup) -> mesh -> data (prepared on first use) -> sharded state -> one
jitted step with in/out shardings and donated state -> loop with evaluation, metrics and orbax
checkpoints. Rerunning the same command resumes, on any mesh; SIGTERM saves and exits 0; a
non-finite loss stops with an error and keeps the last good checkpoint.

--dry_run compiles the step ahead of time for the configured mesh on abstract inputs (no data,
no params) and prints per-device memory; --topology cpu:8 simulates 8 CPU devices, tpu:NAME
compiles for a TPU slice JAX can describe. --distributed forces jax.distributed.initialize
(otherwise: KRONJAX_COORDINATOR from launch/local.sh, or SLURM / TPU pods, are detected).
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

import jax
import ml_collections
import numpy as np
import optax

from kronjax import checkpoint as ckpt
from kronjax import config as config_lib
from kronjax import data as data_lib
from kronjax import metrics as metrics_lib
from kronjax import optim
from kronjax import sharding
from kronjax.model import GPT, GPTConfig, flops_per_token, n_params_nonembedding, param_counts
from kronjax.step import CrossEntropy, State, eval_step, init_state, split_micro, train_step
from kronjax.vocab import ByteVocab

log = logging.getLogger("kronjax.train")


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
        builtin = cfg.data.source in data_lib.BUILTIN_SOURCES  # small: no worker processes
        max_tokens = int(float(cfg.data.get("max_tokens", 0) or 0)) or None
        data_lib.prepare(cfg.data.source, cfg.data.tokenizer, ddir,
                         sp_vocab_size=cfg.data.sp_vocab_size, max_tokens=max_tokens,
                         workers=0 if builtin else (os.cpu_count() or 1), progress=progress)
    return ddir


def padded_vocab_size(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def model_config(cfg: ml_collections.ConfigDict, tokenizer_vocab: int) -> GPTConfig:
    fields = cfg.model.to_dict()
    multiple = int(fields.pop("vocab_multiple", 1) or 1)
    return GPTConfig.from_config(fields, padded_vocab_size(tokenizer_vocab, multiple))


def model_vocab(mcfg: GPTConfig, tokenizer: Any) -> ByteVocab | None:
    """The codec's byte rows, padded to the model's vocabulary; None for the table arms."""
    return tokenizer.byte_vocab(mcfg.pos_dim).pad_to(mcfg.vocab_size) if mcfg.is_kron else None


def run_meta(cfg: ml_collections.ConfigDict, mcfg: GPTConfig, vocab: ByteVocab | None,
             data_meta: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed (plus the resolved config)."""
    shape = {k: getattr(mcfg, k) for k in ("vocab_size", "block_size", "n_layer", "n_head",
                                            "n_embd", "bias", "pos_dim")}
    return {"arm": mcfg.arm, "model_shape": shape, "tokenizer": data_meta["tokenizer"],
            "tokenizer_fingerprint": data_meta["tokenizer_fingerprint"],
            "vocab_fingerprint": vocab.fingerprint if vocab is not None else None,
            "config": cfg.to_dict()}


# -- sharded setup ---------------------------------------------------------------------------
def _section(cfg: ml_collections.ConfigDict, name: str) -> Any:
    """A config section, or an empty dict for configs written before it existed."""
    return cfg.get(name) or {}


def initialize_distributed(cfg: ml_collections.ConfigDict) -> bool:
    """jax.distributed per cfg.dist (auto / on / off); see kronjax.sharding."""
    d = _section(cfg, "dist")
    return sharding.initialize_distributed(
        str(d.get("initialize", "auto")), coordinator=str(d.get("coordinator", "") or ""),
        num_processes=int(d.get("num_processes", 0) or 0),
        process_id=int(d.get("process_id", -1) if d.get("process_id") is not None else -1))


def use_vocab_parallel_ce(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> bool:
    """mesh.vocab_parallel_ce: "auto" (when the mesh has a tensor axis), True or False."""
    value = _section(cfg, "mesh").get("vocab_parallel_ce", "auto")
    text = str(value).strip().lower()
    if text == "auto":
        return mesh.shape["tensor"] > 1
    if text in ("true", "false"):
        return text == "true"
    raise ValueError(f"mesh.vocab_parallel_ce must be 'auto', True or False; got {value!r}")


def ce_chunk_tokens(cfg: ml_collections.ConfigDict) -> int:
    """train.ce_chunk: tokens per chunk of the fused head + cross-entropy, 0 = unfused."""
    value = _section(cfg, "train").get("ce_chunk", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"train.ce_chunk must be an integer >= 0 (tokens per chunk of the "
                         f"fused head + cross-entropy; 0 = materialise the logits); got {value!r}")
    return value


@dataclasses.dataclass
class Plan:
    """Everything sharded about a run: mesh, rules, shardings, and jitted functions."""

    mesh: jax.sharding.Mesh
    rules: sharding.Rules
    abstract: State            # ShapeDtypeStructs carrying their shardings
    state_sh: Any
    micro_shape: tuple[int, int, int]   # (A, B/A, T)
    micro_sh: jax.sharding.NamedSharding
    eval_shape: tuple[int, int]         # (B, T)
    eval_sh: jax.sharding.NamedSharding
    ce: CrossEntropy
    interceptor: Callable[..., Any]
    ce_chunk: int = 0                   # > 0: head + cross-entropy fused (loss_fn)

    def step_fn(self, model: GPT, tx: optax.GradientTransformation,
                schedule: optax.Schedule) -> Callable[..., Any]:
        rep = sharding.replicated(self.mesh)
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
                       out_shardings=sharding.replicated(self.mesh))


def make_plan(cfg: ml_collections.ConfigDict, model: GPT, tx: optax.GradientTransformation,
              devices: Sequence[jax.Device] | None = None) -> Plan:
    mesh = sharding.make_mesh(sharding.mesh_sizes_from_config(cfg), devices)
    rules = sharding.rules_from_config(cfg)
    seq_len = model.config.block_size
    b, a = int(cfg.train.batch_size), int(cfg.train.grad_accum)
    if a < 1 or b % a:
        raise ValueError(f"train.batch_size {b} is not divisible by train.grad_accum {a}")
    abstract, state_sh = sharding.state_shardings(model, tx, seq_len, mesh, rules)
    micro_shape = (a, b // a, seq_len)
    vocab_parallel = use_vocab_parallel_ce(cfg, mesh)
    return Plan(mesh, rules, abstract, state_sh, micro_shape,
                sharding.batch_sharding(mesh, rules, micro_shape, batch_dim=1),
                (b, seq_len), sharding.batch_sharding(mesh, rules, (b, seq_len)),
                sharding.cross_entropy_for(mesh, rules, vocab_parallel),
                sharding.activation_interceptor(mesh, rules),
                0 if vocab_parallel else ce_chunk_tokens(cfg))


def _restore(checkpointer: ckpt.Checkpointer, abstract: State, data_iter: Any) -> State:
    """Restore onto abstract's shardings (any mesh). A checkpoint written by another number
    of processes has no iterator file for this one: every process walks the same global
    order of window batches, so process 0's position is everyone's."""
    step = checkpointer.latest_step()
    data_dir = Path(str(checkpointer.directory)) / str(step) / "data"
    mine = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if mine.exists() or not data_dir.exists():
        return checkpointer.restore(None, abstract, data_iter)[0]
    saved = sorted(data_dir.glob("process_*-of-*.json"))
    if not saved:
        raise FileNotFoundError(f"checkpoint step {step} in {checkpointer.directory} holds no "
                                "data iterator position")
    state, _ = checkpointer.restore(None, abstract, None)
    data_iter.set_state(json.loads(saved[0].read_text()))
    log.warning("checkpoint written by %s processes, resumed by %d: data position taken from %s",
                saved[0].stem.rpartition("-of-")[2], jax.process_count(), saved[0].name)
    return state


def ensure_data_everywhere(cfg: ml_collections.ConfigDict, *, progress: bool) -> Path:
    """ensure_data on process 0 only, then a barrier: the others read what it wrote."""
    if jax.process_count() == 1:
        return ensure_data(cfg, progress=progress)
    from jax.experimental import multihost_utils

    ddir = data_dir_for(cfg)
    error = None
    if jax.process_index() == 0:
        try:
            ensure_data(cfg, progress=progress)
        except Exception as e:  # noqa: BLE001 - re-raised after the barrier
            error = e
    multihost_utils.sync_global_devices("kronjax: data prepared")
    if error is not None:
        raise error
    if not (ddir / "meta.json").exists():
        raise FileNotFoundError(f"process {jax.process_index()} sees no prepared data in {ddir}: "
                                "data.dir must be on storage every host can read (or prepare it "
                                "on each host beforehand)")
    return ddir


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

    Multi-host: every process calls this with the same config and workdir (shared storage);
    jax.distributed is initialised first, per cfg.dist. `stop` is polled after every step
    (default: a SIGTERM flag, installed before anything else so a signal during setup still
    ends in a clean save; under jax.distributed JAX's preemption sync point does this).
    """
    initialize_distributed(cfg)
    if stop is not None:
        return _train(cfg, Path(workdir), stop)
    flag = ckpt.install_sigterm_handler()
    try:
        return _train(cfg, Path(workdir), flag)
    finally:
        getattr(flag, "uninstall", lambda: None)()


def _train(cfg: ml_collections.ConfigDict, workdir: Path, stop: Callable[[], bool]) -> RunResult:
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    progress = bool(cfg.train.progress) and sys.stderr.isatty() and is_main
    ddir = ensure_data_everywhere(cfg, progress=progress)
    data_meta = data_lib.load_meta(ddir)
    tokenizer = data_lib.load_tokenizer_for(ddir)
    mcfg = model_config(cfg, tokenizer.vocab_size)
    vocab = model_vocab(mcfg, tokenizer)
    model = GPT(mcfg, vocab)
    meta = run_meta(cfg, mcfg, vocab, data_meta)
    tx, schedule = optim.from_config(cfg)
    plan = make_plan(cfg, model, tx)
    log.info("mesh %s", sharding.describe(plan.mesh))

    seq_len, steps = mcfg.block_size, int(cfg.train.steps)
    batch_size, n_micro = int(cfg.train.batch_size), int(cfg.train.grad_accum)
    train_tokens = data_lib.load_split(ddir, "train", vocab_size=mcfg.vocab_size)
    val_tokens = data_lib.load_split(ddir, "val", vocab_size=mcfg.vocab_size)
    # This process's rows: the blocks of every micro-batch its devices hold.
    k, n = sharding.process_rows(plan.micro_sh, plan.micro_shape, batch_dim=1)
    dataset = data_lib.train_dataset(train_tokens, seq_len=seq_len, global_batch=batch_size,
                                     seed=int(cfg.seed), process_index=k, process_count=n,
                                     micro_batches=n_micro)
    data_iter = iter(dataset)
    ke, ne = sharding.process_rows(plan.eval_sh, plan.eval_shape)
    eval_set = [sharding.global_batch(b, plan.eval_sh, plan.eval_shape)
                for b in data_lib.eval_batches(val_tokens, seq_len=seq_len, batch=batch_size,
                                               num_batches=int(cfg.data.eval_batches),
                                               process_index=ke, process_count=ne)]
    bytes_per_token = data_meta["splits"]["val"]["bytes"] / max(data_meta["splits"]["val"]["tokens"], 1)

    init = functools.partial(init_state, model, tx, int(cfg.seed), seq_len)
    checkpointer = ckpt.Checkpointer(workdir / "checkpoints", save_every=int(cfg.train.checkpoint_every),
                                     max_to_keep=int(cfg.train.keep_checkpoints))
    saved = checkpointer.read_meta()
    if saved is not None:
        ckpt.check_compatible(saved, meta, keys=("arm", "model_shape", "tokenizer_fingerprint",
                                                 "vocab_fingerprint"))
        state = _restore(checkpointer, plan.abstract, data_iter)
        log.info("resumed from step %d in %s", int(state["step"]), workdir)
    else:
        state = jax.jit(init, out_shardings=plan.state_sh)()
    if is_main:
        (workdir / "config.json").write_text(config_lib.to_json(cfg))

    counts = param_counts(state["params"], mcfg)
    log.info("params: %s", json.dumps(counts))
    fpt = flops_per_token(mcfg, n_params_nonembedding(state["params"], mcfg))
    peak = metrics_lib.device_peak_flops()
    writer = metrics_lib.MetricsWriter(workdir, is_main=is_main, total_steps=steps,
                                       progress=progress, initial_step=int(state["step"]))
    if int(state["step"]) == 0:
        writer.write(0, {f"params_{k}": v for k, v in counts.items()})

    step_fn = plan.step_fn(model, tx, schedule)
    eval_fn = plan.eval_fn(model)
    rng = jax.jit(lambda: jax.random.key(int(cfg.seed) + 1),  # a global array, every process
                  out_shardings=sharding.replicated(plan.mesh))()
    tokens_per_step = batch_size * seq_len
    step = int(state["step"])
    last_loss, val_loss, val_bpb, preempted = float("nan"), None, None, False
    t_last = time.perf_counter()
    try:
        while step < steps:
            batch = sharding.global_batch(split_micro(next(data_iter), n_micro), plan.micro_sh,
                                          plan.micro_shape)
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
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() (= --config.dist.initialize=on)")
    parser.add_argument("--dry_run", action="store_true",
                        help="compile the step for the mesh on abstract inputs; print memory")
    parser.add_argument("--topology", default=None,
                        help="with --dry_run: cpu:N (N simulated CPU devices) or "
                             "PLATFORM:NAME[,key=value...] for jax.experimental.topologies, "
                             "e.g. tpu:v4:2x2x1,chips_per_host_bounds=2x2x1,num_slices=1")
    parser.add_argument("--vocab_size", type=int, default=None,
                        help="with --dry_run: compile with a synthetic vocabulary of N ids")
    args = parser.parse_args(rest)
    if (args.topology or args.vocab_size) and not args.dry_run:
        parser.error("--topology and --vocab_size apply to --dry_run only")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = config_lib.build_config(args.config, overrides)
    except config_lib.ConfigError as e:
        parser.error(str(e))
    if args.distributed:
        if "dist" not in cfg:
            cfg.dist = ml_collections.ConfigDict()
        cfg.dist.initialize = "on"
    if args.dry_run:
        if args.topology and args.topology.startswith("cpu:"):
            try:
                jax.config.update("jax_num_cpu_devices", int(args.topology[4:]))
            except ValueError:
                parser.error(f"--topology cpu:N needs an integer N; got {args.topology!r}")
            jax.config.update("jax_platforms", "cpu")
        from kronjax import dryrun

        try:
            report = dryrun.dry_run(cfg, topology=args.topology, vocab_size=args.vocab_size)
        except dryrun.DryRunError as e:
            parser.exit(2, f"{parser.prog}: error: {e}\n")
        print(json.dumps(report))
        return 0
    workdir = args.workdir or f"runs/{Path(args.config).stem}_{cfg.model.arm}"
    result = train(cfg, workdir)
    if jax.process_index() == 0:
        print(json.dumps({"workdir": str(workdir), **dataclasses.asdict(result)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
