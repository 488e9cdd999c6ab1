"""Which cluster a process runs in, and `jax.distributed.initialize` when it runs in one.

launch/local.sh's KRONJAX_* variables, a multi-task srun, or a multi-host TPU slice that
advertises its workers: detected here, before anything touches a JAX device, so every entry
point (train, the dry run) starts the same way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from kronjax import config as config_lib

__all__ = ["CPU_SCHEDULER_FLAG", "ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID",
           "detect_cluster", "distributed_from_config", "initialize_distributed",
           "safe_cpu_collectives"]

log = logging.getLogger("kronjax.cluster")

# Multi-process launch by environment (launch/local.sh sets these).
ENV_COORDINATOR = "KRONJAX_COORDINATOR"
ENV_NUM_PROCESSES = "KRONJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "KRONJAX_PROCESS_ID"
# XLA:CPU's concurrency-optimised scheduler can start two independent collectives of one step in
# different orders on different (simulated) CPU devices, which then wait for each other for ever
# (jaxlib 0.10.2: a looped 2x2x2 step hung within 1 to 8 steps in 7 of 8 runs; with the flag
# off, none in 95 steps). Only XLA:CPU reads it; TPU and GPU ignore it.
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")


def safe_cpu_collectives(environ: dict[str, str] | None = None) -> bool:
    """Turn the scheduler above off in XLA_FLAGS unless the user chose; call before any JAX
    backend starts (XLA reads the variable then). True when it was added."""
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    if CPU_SCHEDULER_FLAG in flags:
        return False
    env["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULER_FLAG}=false".strip()
    return True


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """'env' (KRONJAX_COORDINATOR), 'slurm' (srun with > 1 task), 'tpu' (a multi-host TPU
    slice that advertises its workers) or None: a single process."""
    env = os.environ if environ is None else environ
    if env.get(ENV_COORDINATOR):
        return "env"
    if all(v in env for v in _SLURM_VARS) and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if "," in hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return None


def initialize_distributed(mode: str = "auto", *, coordinator: str = "", num_processes: int = 0,
                           process_id: int = -1) -> bool:
    """Call `jax.distributed.initialize` when asked or when the environment calls for it.

    mode: "off" never; "on" always (explicit arguments if given, else JAX's cluster
    auto-detection: SLURM, Cloud TPU, Kubernetes, MPI); "auto" only when `detect_cluster`
    finds several processes. KRONJAX_COORDINATOR / KRONJAX_NUM_PROCESSES /
    KRONJAX_PROCESS_ID (set by launch/local.sh) win over everything but "off", and select
    gloo collectives for CPU devices. Must run before anything touches a JAX device.
    Returns whether JAX runs distributed.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"dist.initialize must be 'auto', 'on' or 'off'; got {mode!r}")
    if jax.distributed.is_initialized():
        return True
    if mode == "off":
        return False
    cluster = detect_cluster()
    if cluster == "env":
        try:
            coordinator = os.environ[ENV_COORDINATOR]
            num_processes = int(os.environ[ENV_NUM_PROCESSES])
            process_id = int(os.environ[ENV_PROCESS_ID])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{ENV_COORDINATOR} is set, so {ENV_NUM_PROCESSES} and "
                             f"{ENV_PROCESS_ID} must be integers too: {e}") from e
    elif mode == "auto" and cluster is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only
    kwargs: dict[str, Any] = {}
    if coordinator:
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes,
                      process_id=process_id)
    log.info("jax.distributed.initialize(%s) [%s]", kwargs or "auto-detect", cluster or mode)
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def distributed_from_config(cfg: ml_collections.ConfigDict) -> bool:
    """`initialize_distributed` per cfg.dist (auto / on / off)."""
    d = config_lib.section(cfg, "dist")
    return initialize_distributed(
        str(d.get("initialize", "auto")), coordinator=str(d.get("coordinator", "") or ""),
        num_processes=int(d.get("num_processes", 0) or 0),
        process_id=int(d.get("process_id", -1) if d.get("process_id") is not None else -1))
