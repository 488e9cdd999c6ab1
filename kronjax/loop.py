"""The training loop: step, evaluate, log, checkpoint, until the configured step count.

`train` assembles the run (kronjax.run), then iterates one jitted step per batch. Rerunning
resumes, on any mesh; SIGTERM or Ctrl-C saves and exits 0; a non-finite loss stops with an error and
keeps the last good checkpoint. `python -m kronjax.train` is its command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections
import numpy as np

from kronjax import cluster, compile_cache, console, signals, storage, wandb_sink
from kronjax import metrics as metrics_lib
from kronjax import run as run_lib
from kronjax.errors import UserError, close_all
from kronjax.lock import workdir_lock
from kronjax.model import flops_per_token, n_params_nonembedding, param_counts
from kronjax.workdir import Workdir

log = logging.getLogger("kronjax.loop")


class NonFiniteLossError(UserError, RuntimeError):
    """The loss went NaN/inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class RunResult:
    step: int
    last_loss: float | None   # None when this process trained no step
    val_loss: float | None
    val_bpb: float | None
    preempted: bool


def train(cfg: ml_collections.ConfigDict, workdir: str | Path | Workdir, *,
          stop: Callable[[], bool] | None = None) -> RunResult:
    """Train (or resume) the run in workdir; returns its final numbers.

    Multi-host: every process calls this with the same config and workdir (shared storage:
    a gs:// bucket, or a shared filesystem);
    jax.distributed is initialised first, per cfg.dist. `stop` is polled after every step
    (default: a SIGTERM flag, installed before anything else so a signal during setup still
    ends in a clean save; under jax.distributed JAX's preemption sync point does this).
    A second trainer on the same workdir is refused (kronjax.lock.WorkdirBusyError).
    """
    wd = Workdir.at(workdir)  # gs:// URLs are checked here, before anything is written
    if storage.is_url(str(cfg.data.get("dir", "") or "")):
        storage.as_path(str(cfg.data.dir))
    cluster.distributed_from_config(cfg)
    # Process 0 holds the workdir's lock for the whole run (the others write nothing of theirs).
    # Process 0 holds the lock; the persistent compilation cache (kronjax.compile_cache) is
    # set before the first compile.
    with (workdir_lock(wd) if jax.process_index() == 0 else contextlib.nullcontext()) as lock, \
            compile_cache.use(cfg, wd):
        held = lock.check if lock is not None else (lambda: None)
        if stop is not None:
            return _train(run_lib.assemble(cfg, wd), stop, held)
        flag = signals.install_sigterm_handler()
        try:
            return _train(run_lib.assemble(cfg, wd), flag, held)
        finally:
            getattr(flag, "uninstall", lambda: None)()


def _train(run: run_lib.Run, stop: Callable[[], bool], held: Callable[[], None]) -> RunResult:
    cfg, plan, state, checkpointer = run.cfg, run.plan, run.state, run.checkpointer
    mcfg = run.model.config
    steps = int(cfg.train.steps)
    if int(state["step"]) >= steps:  # nothing to do: said, not a silent rc 0
        checkpointer.close()
        log.warning("nothing to train: the checkpoint in %s is at step %d and train.steps is "
                    "%d; raise --config.train.steps above %d to train further",
                    run.workdir, int(state["step"]), steps, int(state["step"]))
        return RunResult(int(state["step"]), None, None, None, False)
    counts = param_counts(state["params"], mcfg)
    log.info("params: %s total (input side %s, output head %s, rest %s)",
             *(f"{counts[k]:,}" for k in ("total", "input_side", "head", "rest")))
    fpt = flops_per_token(mcfg, n_params_nonembedding(state["params"], mcfg))
    peak = metrics_lib.device_peak_flops()
    mirror = wandb_sink.open_sink(cfg, run.workdir, counts) if run.is_main else None
    writer = metrics_lib.MetricsWriter(run.workdir, is_main=run.is_main, total_steps=steps,
                                       progress=run.progress, initial_step=int(state["step"]),
                                       mirror=mirror)
    if int(state["step"]) == 0:
        writer.write(0, {f"params_{k}": v for k, v in counts.items()})

    step_fn = plan.step_fn(run.model, run.tx, run.schedule)
    eval_fn = plan.eval_fn(run.model)
    rng = plan.key(int(cfg.seed) + 1)
    tokens_per_step = int(cfg.train.batch_size) * mcfg.block_size
    step = int(state["step"])
    last_loss: float | None = None
    val_loss, val_bpb, preempted = None, None, False
    throughput = metrics_lib.Throughput(window=1)  # each step's own rate
    log_every = int(cfg.train.log_every)
    clock, first = console.StepClock(), step + 1
    failed = True
    try:
        while step < steps:
            batch = plan.place(next(run.data_iter))
            state, m = step_fn(state, batch, rng)
            step += 1
            held()  # another trainer took a bucket lock over: stop before writing anything
            m = jax.device_get(m)
            last_loss = float(m["loss"])
            if not math.isfinite(last_loss):
                latest = checkpointer.latest_step()
                kept = (f"the last good checkpoint (step {latest}) is kept in "
                        f"{checkpointer.directory}" if latest is not None else
                        "no checkpoint had been saved")
                raise NonFiniteLossError(
                    f"loss is {last_loss} at step {step}: the run diverged; stopping without "
                    f"saving, {kept}. Lower optim.peak_lr (or raise optim.warmup_steps) and "
                    "rerun.")
            record = {k: float(v) for k, v in m.items()}
            record["tokens_per_s"] = throughput.tick(tokens_per_step) or float("inf")
            mfu = (metrics_lib.mfu(record["tokens_per_s"], fpt, jax.device_count(), peak)
                   if peak else None)
            if mfu is not None:
                record["mfu"] = mfu
            clock.tick(step)
            if step % log_every == 0 or step in (first, steps):
                log.info("%s", console.step_line(step, steps, record, clock.eta_s(step, steps)))
            if step % int(cfg.train.eval_every) == 0 or step == steps:
                val_loss = float(np.mean([float(eval_fn(state["params"], b))
                                          for b in run.eval_set]))
                val_bpb = val_loss / math.log(2) / run.bytes_per_token
                record.update(val_loss=val_loss, val_bpb=val_bpb)
                log.info("%s", console.eval_line(step, steps, val_loss, val_bpb))
                throughput.reset()  # evaluation time is not training throughput
            writer.write(step, record)
            if "val_loss" in record:
                writer.sync()  # a bucket's metrics.jsonl is rewritten whole: at evaluations
            checkpointer.check()  # a failed background save stops the run now, in one line
            if stop() or checkpointer.reached_preemption(step):
                checkpointer.save(step, state, run.data_iter, run.meta, force=True)
                preempted = True
                log.warning("stop requested: saved step %d to %s, exiting", step,
                            checkpointer.directory)
                break
            if checkpointer.save(step, state, run.data_iter, run.meta, force=step == steps):
                log.info("checkpoint: saving step %d to %s", step, checkpointer.directory)
                writer.sync()  # ... and at saves
        failed = False
    finally:  # the first error wins: a cleanup failing after it is kept at debug level
        close_all(checkpointer.close, writer.close, after_error=failed)
    return RunResult(step, last_loss, val_loss, val_bpb, preempted)
