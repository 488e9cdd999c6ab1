"""kronjax.evaluate: lm-eval on kronjax's own model equals lm-eval's `hf` model on the export.

The four tiny arms of tiny_runs.four_arms (shared with test_export) and their
`python -m kronjax.export hf` directories. lm-eval's HFLM runs in process on CPU in float32,
with kronjax's eot as its prefix token (it would otherwise take the exported `<s>`, which
kronjax never trains on). Needs the `eval` and `export` extras; skipped without them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_runs  # noqa: E402

from kronjax.evaluate import make_task
from kronjax.evaluate.harness import TASK_DIR

ATOL = 1e-4          # nats, per loglikelihood request
ROLLING_RTOL = 1e-6  # HFLM sums each window in float32: ~1e-5 nats at -4,000


def _docs(name: str, n: int) -> list[dict[str, Any]]:
    lines = (TASK_DIR / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


def test_shipped_task_data_is_what_make_task_writes(tmp_path: Path) -> None:
    """The committed JSONL is reproducible, from the held-out play only, and well formed."""
    assert make_task.main(["--out", str(tmp_path)]) == 0
    for name in ("shakespeare_nextline.jsonl", "shakespeare_speaker.jsonl",
                 "shakespeare_passages.jsonl"):
        assert (tmp_path / name).read_bytes() == (TASK_DIR / name).read_bytes(), name
    held_out = make_task.held_out_text()
    assert held_out.startswith("# All's Well That Ends Well")
    for doc in _docs("shakespeare_nextline.jsonl", 100):
        assert len(set(doc["choices"])) == 4 and 0 <= doc["label"] < 4
        assert doc["context"] + doc["choices"][doc["label"]] in held_out
    for doc in _docs("shakespeare_passages.jsonl", 16):
        assert doc["text"] in held_out


@pytest.fixture(scope="module")
def lms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Any]]:
    """{arm: (KronjaxLM on the run, HFLM on its export)}."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # lm_eval.models.huggingface imports it
    from lm_eval.models.huggingface import HFLM

    from kronjax.evaluate.lm import KronjaxLM
    from kronjax.run import load_run

    workdirs = tiny_runs.four_arms(tmp_path_factory)
    hf_dirs = tiny_runs.hf_exports(tmp_path_factory)
    out = {}
    for arm in tiny_runs.ARMS:
        run = load_run(workdirs[arm])
        hf = HFLM(pretrained=str(hf_dirs[arm]), device="cpu", dtype="float32", batch_size=4,
                  prefix_token_id=run.tokenizer.eot_id)
        out[arm] = (KronjaxLM(run, batch_size=4), hf)
    return out


def _requests() -> tuple[list[Any], list[Any]]:
    from lm_eval.api.instance import Instance

    nextline = _docs("shakespeare_nextline.jsonl", 3)
    passages = _docs("shakespeare_passages.jsonl", 2)
    pairs = [(d["context"], c) for d in nextline for c in d["choices"]]
    pairs += [("", "To be, or not to be"),              # empty context: the prefix token
              (passages[0]["text"], " Farewell.")]      # ~400 tokens: left-truncated to 32
    ll = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    rolling = [Instance("loglikelihood_rolling", {}, (p["text"],), i)  # ~13 windows each
               for i, p in enumerate(passages)]
    return ll, rolling


@pytest.mark.parametrize("arm", tiny_runs.ARMS)
def test_loglikelihoods_equal_lm_evals_hf_model_on_the_export(lms: dict[str, Any],
                                                              arm: str) -> None:
    kron_lm, hf_lm = lms[arm]
    ll, rolling = _requests()
    for inst in ll + rolling:  # the same token ids on both sides
        for text in inst.args:
            assert kron_lm.tok_encode(text) == hf_lm.tok_encode(text), text[:40]
    assert kron_lm.prefix_token_id == hf_lm.prefix_token_id
    ours = kron_lm.loglikelihood(ll, disable_tqdm=True)
    theirs = hf_lm.loglikelihood(ll, disable_tqdm=True)
    diff = max(abs(a[0] - b[0]) for a, b in zip(ours, theirs, strict=True))
    print(f"{arm}: loglikelihood max |diff| {diff:.2e} over {len(ll)} requests")
    assert diff <= ATOL
    assert [a[1] for a in ours] == [b[1] for b in theirs]  # is_greedy
    assert all(-1e4 < a[0] < 0 for a in ours)
    ours_r = kron_lm.loglikelihood_rolling(rolling, disable_tqdm=True)
    theirs_r = hf_lm.loglikelihood_rolling(rolling, disable_tqdm=True)
    print(f"{arm}: rolling {ours_r} vs {theirs_r}")
    np.testing.assert_allclose(ours_r, theirs_r, rtol=ROLLING_RTOL, atol=ATOL)


def test_long_continuations_score_like_rolling_windows(lms: dict[str, Any]) -> None:
    """A continuation longer than the context (HFLM refuses one) is scored in pieces of T
    tokens: exactly lm-eval's own rolling windows over the same text."""
    from lm_eval.api.instance import Instance

    kron_lm = lms["kron"][0]
    text = _docs("shakespeare_passages.jsonl", 1)[0]["text"][:300]
    assert len(kron_lm.tok_encode(text)) > 2 * kron_lm.max_length
    (whole, greedy), = kron_lm.loglikelihood([Instance("loglikelihood", {}, ("", text), 0)],
                                             disable_tqdm=True)
    rolled, = kron_lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)],
                                            disable_tqdm=True)
    assert whole == pytest.approx(rolled, abs=1e-9) and not greedy


def test_generate_until_is_kronjax_greedy_sampling(lms: dict[str, Any]) -> None:
    from lm_eval.api.instance import Instance

    from kronjax.generate import generate

    kron_lm, hf_lm = lms["kron"]
    docs = _docs("shakespeare_speaker.jsonl", 2)
    reqs = [Instance("generate_until", {}, (d["context"], {"until": ["zzz"], "max_gen_toks": 6,
                                                            "do_sample": False}), i)
            for i, d in enumerate(docs)]
    got = kron_lm.generate_until(reqs, disable_tqdm=True)
    run, tok = kron_lm.run, kron_lm.run.tokenizer
    for doc, text in zip(docs, got, strict=True):
        ids = tok.encode(doc["context"])[-(kron_lm.max_length - 6):]
        new = generate(run, ids, 6)[len(ids):]
        if tok.eot_id in new:
            new = new[:new.index(tok.eot_id)]
        assert text == tok.decode(new)
    assert got == hf_lm.generate_until(reqs, disable_tqdm=True)
    stop = [Instance("generate_until", {}, (docs[0]["context"],
                                            {"until": [got[0][:2]], "max_gen_toks": 6}), 0)]
    if got[0][:2].strip():
        assert kron_lm.generate_until(stop, disable_tqdm=True) == [""]


def test_cli_writes_results_that_match_the_hf_export_path(
        lms: dict[str, Any], tmp_path_factory: pytest.TempPathFactory,
        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m kronjax.evaluate` on a run against lm-eval's own evaluation of the export:
    the same metrics, and per request the same log-likelihoods and generations."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from kronjax.evaluate import cli

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    workdir = tiny_runs.four_arms(tmp_path_factory)["kron"]
    argv = ["--workdir", str(workdir), "--tasks", "kronjax_shakespeare", "--limit", "4",
            "--log-samples"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    path = workdir / "lm_eval" / "step10_kronjax_shakespeare.json"
    assert f"results: {path}" in out and "kronjax_shakespeare_nextline" in out
    ours = json.loads(path.read_text())
    assert ours["kronjax"]["offline"] and ours["kronjax"]["step"] == 10
    theirs = simple_evaluate(model=lms["kron"][1], tasks=["kronjax_shakespeare"], limit=4,
                             task_manager=TaskManager(include_path=str(TASK_DIR),
                                                      include_defaults=False),
                             bootstrap_iters=1000, log_samples=True)
    assert theirs is not None
    for task, metrics in theirs["results"].items():
        for key, value in metrics.items():
            if key.split(",")[0] in ("acc", "acc_norm", "exact_match"):
                assert ours["results"][task][key] == value, (task, key)
            elif key.split(",")[0] in ("bits_per_byte", "byte_perplexity", "word_perplexity"):
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-5), (task, key)
        for a, b in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            assert a["doc_id"] == b["doc_id"]
            for ra, rb in zip(a["resps"], b["resps"], strict=True):
                if isinstance(rb[0], str):
                    assert ra[0] == rb[0]
                else:  # [loglikelihood, is_greedy] or a rolling total
                    got = ra[0][0] if isinstance(ra[0], list) else ra[0]
                    want = rb[0][0] if isinstance(rb[0], (list, tuple)) else rb[0]
                    assert got == pytest.approx(want, abs=ATOL, rel=ROLLING_RTOL)
    # An existing result is kept: refused in one line before any work.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "exists; pass --force" in err and len(err.strip().splitlines()) == 1


def test_cli_says_which_extra_and_refuses_unknown_tasks(
        lms: dict[str, Any], tmp_path_factory: pytest.TempPathFactory,
        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from kronjax.evaluate import cli

    workdir = tiny_runs.four_arms(tmp_path_factory)["bpe_tied"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--workdir", str(workdir), "--tasks", "kronjax_no_such_task"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unknown task(s) kronjax_no_such_task" in err
    assert len(err.strip().splitlines()) == 1
    assert not (workdir / "lm_eval").exists()
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--workdir", str(workdir), "--tasks", "kronjax_shakespeare"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "pip install -e '.[eval]'" in err
    assert len(err.strip().splitlines()) == 1
