"""Which prepared data a config means, and having them here: prepared on first use, or
copied from a bucket to this host.

The trainer's cache directory is named after the source and tokenizer plus a short hash of
what defines the data (kronjax.data.fingerprint), so two requests never share one. Every entry
point that needs a config's data (train, sample, the dry run, the benchmarks) comes here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections

from kronjax import storage
from kronjax.data import fingerprint
from kronjax.data import remote as remote_data
from kronjax.data.corpora import BUILTIN_SOURCES
from kronjax.data.prepare import prepare
from kronjax.data.store import META

__all__ = ["SMALL_SOURCE_BYTES", "data_dir_for", "ensure_data", "ensure_data_everywhere",
           "is_prepared", "local_tokenizer_dir"]

log = logging.getLogger("kronjax.data")

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
    return (ddir / META).exists()


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
    small = source in BUILTIN_SOURCES or (size is not None and size < SMALL_SOURCE_BYTES)
    prepare(source, cfg.data.tokenizer, ddir, sp_vocab_size=cfg.data.sp_vocab_size,
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


def local_tokenizer_dir(ddir: Path | Any) -> Path:
    """A prepared directory whose tokenizer can be loaded here: itself, or for a bucket this
    host's copy of its meta.json and tokenizer (the token files are not copied)."""
    return remote_data.fetch(ddir, data=False) if storage.is_url(ddir) else ddir
