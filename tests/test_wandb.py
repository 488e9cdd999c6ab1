"""Weights & Biases, offline (WANDB_MODE=offline: nothing leaves the machine): the W&B run's
own transaction log, read back record by record, holds exactly metrics.jsonl's values; a
resume continues the same W&B run; W&B that cannot be used costs one warning, not the run."""

from __future__ import annotations

import json
import logging
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

wandb = pytest.importorskip("wandb")

from kronjax import (
    compare,  # noqa: E402
    loop,  # noqa: E402
)
from kronjax import config as config_lib  # noqa: E402
from kronjax.metrics import read_metrics  # noqa: E402

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.py"


def _records(path: Path) -> Iterator[Any]:
    """The protobuf Records of a .wandb file: a 7-byte header (":W&B", magic, version), then
    leveldb-log blocks of 32 KiB whose chunks (7-byte header: crc, length, type FULL / FIRST /
    MIDDLE / LAST) carry the records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _offline_runs(workdir: Path) -> list[dict[str, Any]]:
    runs = []
    for f in sorted(workdir.glob("wandb/offline-run-*/run-*.wandb")):
        out: dict[str, Any] = {"history": [], "summary": {}, "run": None}
        for r in _records(f):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in r.history.item})
            elif kind == "summary":
                out["summary"].update({u.key or "/".join(u.nested_key): json.loads(u.value_json)
                                       for u in r.summary.update})
            elif kind == "run":
                out["run"] = r.run
        runs.append(out)
    return runs


SHORT = {"train.steps": 2, "train.eval_every": 2, "optim.warmup_steps": 1}


def _cfg(data: Path, **over: Any) -> Any:
    base = {"data.dir": str(data), "train.steps": 10, "train.eval_every": 5,
            "train.checkpoint_every": 5, "log.wandb": "kronjax-test", "log.wandb_tags": "a,b"}
    return config_lib.build_config(TINY, [(k, str(v)) for k, v in {**base, **over}.items()])


def test_offline_run_holds_every_metrics_record_and_a_resume_continues_it(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    wd = tmp_path / "run"
    loop.train(_cfg(tiny_data), wd, stop=lambda: False)
    run_id = json.loads((wd / "wandb.json").read_text())["id"]
    loop.train(_cfg(tiny_data, **{"train.steps": 15}), wd, stop=lambda: False)  # a resume
    assert json.loads((wd / "wandb.json").read_text())["id"] == run_id
    first, second = _offline_runs(wd)
    assert first["run"].run_id == second["run"].run_id == run_id
    assert first["run"].project == "kronjax-test" and list(first["run"].tags) == ["a", "b"]
    logged = {h["_step"]: h for run in (first, second) for h in run["history"]}
    local = read_metrics(wd / "metrics.jsonl")
    assert sorted(logged) == [r["step"] for r in local] == list(range(0, 16))
    for rec in local:
        for key, value in rec.items():
            if key not in ("step", "time") and isinstance(value, (int, float)):
                assert logged[rec["step"]][key] == pytest.approx(value, rel=1e-12), (rec, key)
    assert {h["_step"] for h in logged.values() if "val_loss" in h} == {5, 10, 15}
    assert first["summary"]["params_total"] == local[0]["params_total"]


def test_unusable_wandb_is_one_warning_and_the_run_goes_on(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def refuse(**kwargs: Any) -> None:
        raise wandb.errors.UsageError("project 'nope' not found")

    monkeypatch.setattr(wandb, "init", refuse)
    with caplog.at_level(logging.WARNING, logger="kronjax.wandb"):
        result = loop.train(_cfg(tiny_data, **SHORT), tmp_path / "a", stop=lambda: False)
    assert result.step == 2 and len(read_metrics(tmp_path / "a" / "metrics.jsonl")) == 3
    assert [r.message for r in caplog.records] == [
        "W&B could not start (UsageError: project 'nope' not found): logging locally only"]
    caplog.clear()
    monkeypatch.setitem(sys.modules, "wandb", None)  # the extra is not installed
    with caplog.at_level(logging.WARNING, logger="kronjax.wandb"):
        loop.train(_cfg(tiny_data, **SHORT), tmp_path / "b", stop=lambda: False)
    assert "pip install 'kronjax[wandb]'" in caplog.text and len(caplog.records) == 1


def test_compare_names_runs_by_arm_and_seed(tiny_data: Path) -> None:
    cfg = _cfg(tiny_data)
    assert compare.run_config(cfg, "kron", 2).log.wandb_name == "kron_s2"
    cfg.log.wandb = ""
    assert compare.run_config(cfg, "kron", 2).log.wandb_name == ""  # W&B off: untouched
    # where a run logs is not what it computes: an earlier run still matches
    assert compare.config_diff(_cfg(tiny_data), json.loads(config_lib.to_json(
        _cfg(tiny_data, **{"log.wandb": "", "log.wandb_tags": ""})))) == []
