"""JAX's persistent compilation cache, on by default for every run.

A fresh process compiles the train step, the eval step and the init again; on this
project's 2-core CPU that is most of a tiny run's time to its first step. With the cache, a
second identical run (a resume, the next seed of a compare, a rerun after a crash) loads
the executables XLA wrote the first time.

`train.compile_cache` chooses where:

- "" (the default): $KRONJAX_COMPILE_CACHE or $JAX_COMPILATION_CACHE_DIR when set (the
  first names a directory or "off"), else the workdir's bucket when the
  workdir is a `gs://` URL (`gs://BUCKET/.cache/kronjax/xla`, shared by every host of a pod
  and every later VM: jax writes entries from process 0 only, so on a multi-host slice a
  per-host directory helps that host alone), else `~/.cache/kronjax/xla`;
- "off" (or "none"): no persistent cache;
- a directory, or a `gs://` URL: that.

`gs://` works through jax's own cache (jax._src.lru_cache over etils.epath, which reaches
Cloud Storage through fsspec and gcsfs). Entries are never evicted (jax's default: no size
limit); delete the directory to reclaim the space. Like any compilation cache it is trusted
code: point it only at storage that only you can write.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

from kronjax.errors import UserError

log = logging.getLogger("kronjax.compile_cache")

KEY = "train.compile_cache"
OFF = ("off", "none")
ENV = "KRONJAX_COMPILE_CACHE"      # the default location, where "" would use ~/.cache/...
ENV_JAX = "JAX_COMPILATION_CACHE_DIR"
BUCKET_SUBDIR = ".cache/kronjax/xla"
# A local entry costs one small file read; programs that compile faster than that are not
# worth one. Every remote entry costs a round trip: keep jax's own threshold there.
MIN_COMPILE_S_LOCAL = 0.2
MIN_COMPILE_S_REMOTE = 1.0


def default_dir() -> Path:
    return Path.home() / ".cache" / "kronjax" / "xla"


def setting_of(cfg: Any) -> str:
    """cfg.train.compile_cache; "" (the default) for configs written before the key."""
    train = cfg.get("train") if hasattr(cfg, "get") else None
    value = (train or {}).get("compile_cache", "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{KEY} must be a string: \"\" (default: ~/.cache/kronjax/xla), "
                        f"\"off\", a directory or a gs:// URL; got {value!r}")
    return value.strip()


def resolve(setting: str, workdir: str | os.PathLike[str] | None = None,
            environ: dict[str, str] | None = None) -> str | None:
    """The cache directory `setting` means for a run in workdir; None when it is off."""
    env = os.environ if environ is None else environ
    if setting.lower() in OFF:
        return None
    if not setting and env.get(ENV):
        return resolve(env[ENV], workdir, {})
    if setting:
        if "://" in setting and not setting.startswith("gs://"):
            raise UserError(f"{KEY}: only local directories and gs:// URLs are supported; "
                            f"got {setting!r}")
        return setting if setting.startswith("gs://") else str(Path(setting).expanduser())
    if env.get(ENV_JAX):
        return env[ENV_JAX]
    where = "" if workdir is None else str(workdir)
    if where.startswith("gs://"):
        bucket = where[len("gs://"):].split("/", 1)[0]
        return f"gs://{bucket}/{BUCKET_SUBDIR}"
    return str(default_dir())


def configure(directory: str | None) -> str | None:
    """Point jax's persistent cache at directory (None: off) for the compiles that follow.

    jax builds its cache object once per process, at the first compile after a directory is
    set; it is reset here so a process that trains several runs (compare, the tests) follows
    each run's setting.
    """
    from jax.experimental.compilation_cache import compilation_cache as cc

    cc.reset_cache()
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    remote = directory.startswith("gs://")
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      MIN_COMPILE_S_REMOTE if remote else MIN_COMPILE_S_LOCAL)
    if remote:  # XLA's own GPU autotune cache writes with C++ file APIs: local paths only
        jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
    else:
        Path(directory).mkdir(parents=True, exist_ok=True)
    cc.set_cache_dir(directory)
    return directory


_FLAGS = ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
          "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_enable_xla_caches")


@contextlib.contextmanager
def use(cfg: Any, workdir: str | os.PathLike[str] | None = None) -> Iterator[str | None]:
    """`setup` for the duration of a run, then jax's settings as they were: a process that
    trains and then compiles other things (the tests, a notebook) does not keep caching
    them where the run said."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    saved = {flag: getattr(jax.config, flag) for flag in _FLAGS}
    try:
        yield setup(cfg, workdir)
    finally:
        cc.reset_cache()
        for flag, value in saved.items():
            jax.config.update(flag, value)


def setup(cfg: Any, workdir: str | os.PathLike[str] | None = None) -> str | None:
    """Configure the cache a run of cfg in workdir uses; returns the directory (None: off)."""
    directory = resolve(setting_of(cfg), workdir)
    if directory is not None and directory.startswith("gs://"):
        import importlib.util

        if importlib.util.find_spec("gcsfs") is None:  # etils.epath reaches gs:// through it
            log.warning("compilation cache %s needs gcsfs (pip install gcsfs); compiling "
                        "without it", directory)
            return configure(None)
    try:
        used = configure(directory)
    except OSError as e:  # an unwritable directory costs speed, never the run
        log.warning("compilation cache %s unusable (%s); compiling without it", directory, e)
        return configure(None)
    log.debug("compilation cache: %s", used or "off")
    return used


def entries(directory: str | os.PathLike[str]) -> list[str]:
    """Names of the executables jax has written to a local cache directory."""
    path = Path(directory)
    return sorted(p.name for p in path.glob("*-cache")) if path.is_dir() else []
