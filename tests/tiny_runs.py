"""Two tiny trained runs (bpe_tied, kron; 10 steps) built once per test session.

Built through `kronjax.compare.run_all` after a kron run was stopped at step 5, so the same
build exercises compare's resume path; test_compare checks what it recorded. Shared by
test_probes and test_compare through a module-level cache (session fixtures defined in a
test module are private to it). `four_arms` adds bpe_untied and kron_tied (bias=True, the
vocabulary padded to 576) and `hf_exports` exports all four as Hugging Face directories, for
test_export and test_evaluate.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

STEPS = 10
STOP_AT = 5
ARMS = ("bpe_tied", "bpe_untied", "kron", "kron_tied")
PADDED = 96  # vocab_multiple of the runs four_arms trains: 512 ids -> 576 rows
_CACHE: dict[str, Any] = {}


@dataclasses.dataclass
class TinyRuns:
    cfg: Any                  # the compare base config (ml_collections)
    overrides: list[tuple[str, str]]
    out: Path                 # compare's output directory
    data: Path                # the prepared data set
    status: dict[str, str]    # what run_all did per run
    partial: list[dict]       # kron_s0's metrics records before compare resumed it

    @property
    def bpe(self) -> Path:
        return self.out / "bpe_tied_s0"

    @property
    def kron(self) -> Path:
        return self.out / "kron_s0"


def get(tmp_path_factory: pytest.TempPathFactory) -> TinyRuns:
    if "runs" not in _CACHE:
        _CACHE["runs"] = _build(tmp_path_factory.mktemp("tiny_runs"))
    return _CACHE["runs"]


def _build(root: Path) -> TinyRuns:
    from kronjax import compare
    from kronjax import config as config_lib
    from kronjax.loop import train

    data, out = root / "data", root / "compare"
    overrides = [("train.steps", str(STEPS)), ("train.eval_every", "5"),
                 ("train.checkpoint_every", "5"), ("train.progress", "False"),
                 ("data.dir", str(data))]
    cfg = config_lib.build_config(config_lib.REPO_CONFIGS / "tiny.py", overrides)
    calls = [0]

    def stop() -> bool:  # train asks after every step: stop after STOP_AT steps
        calls[0] += 1
        return calls[0] >= STOP_AT

    partial_run = train(compare.run_config(cfg, "kron", 0), out / "kron_s0", stop=stop)
    assert partial_run.preempted and partial_run.step == STOP_AT
    lines = (out / "kron_s0" / "metrics.jsonl").read_text().splitlines()
    partial = [json.loads(line) for line in lines]
    status = compare.run_all(cfg, ["bpe_tied", "kron"], [0], out)
    return TinyRuns(cfg, overrides, out, data, status, partial)


def four_arms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{arm: workdir} for all four arms: `get`'s two, plus bpe_untied and kron_tied trained on
    the same data with bias=True and the vocabulary padded to PADDED's multiple."""
    if "four" not in _CACHE:
        import copy

        from kronjax import compare

        runs = get(tmp_path_factory)
        cfg = copy.deepcopy(runs.cfg)
        cfg.model.bias, cfg.model.vocab_multiple = True, PADDED
        more = tmp_path_factory.mktemp("more_arms")
        compare.run_all(cfg, ["bpe_untied", "kron_tied"], [0], more)
        _CACHE["four"] = {"bpe_tied": runs.bpe, "kron": runs.kron,
                          "bpe_untied": more / "bpe_untied_s0", "kron_tied": more / "kron_tied_s0"}
    return _CACHE["four"]


def hf_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{arm: `python -m kronjax.export hf` directory} of `four_arms` (needs transformers)."""
    if "hf" not in _CACHE:
        from kronjax.export import cli as export_cli

        out = tmp_path_factory.mktemp("exported_hf")
        for arm, workdir in four_arms(tmp_path_factory).items():
            assert export_cli.main(["hf", "--workdir", str(workdir), "--out", str(out / arm)]) == 0
        _CACHE["hf"] = {arm: out / arm for arm in ARMS}
    return _CACHE["hf"]
