"""The prepared-data format: sharded token files + meta.json; writing (prepare) and reading.

`prepare` streams a corpus (kronjax.corpora), tokenizes it in worker processes (order kept)
and writes each split as shards train_00000.bin, train_00001.bin, ... (flat token ids,
documents separated by the tokenizer's end-of-text id) plus meta.json: tokenizer fingerprint,
per-split and per-shard token counts, UTF-8 byte counts (for bits per byte). A prepare that is
interrupted continues when rerun with the same arguments: finished shards are recorded
atomically (in .prepare-progress.json, removed once meta.json is written) and never
rewritten; a partial shard is discarded and regenerated identically from its first document.
`load_split` reads a split's shards as one token sequence (`ShardedTokens`). Format 1 (one
{split}.bin per split, written before sharding existed) is still read.
"""

from __future__ import annotations

import collections
import datetime
import itertools
import json
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from kronjax.corpora import canonical_source, iter_documents
from kronjax.tokenizers import Tokenizer, load_tokenizer, train_sentencepiece, write_atomic

FORMAT_VERSION = 2  # 2: sharded splits; 1 (one {split}.bin per split) is still read
READ_VERSIONS = (1, 2)
SPLITS = ("train", "val")
CACHED_SP = "tokenizer.model"
META = "meta.json"
PROGRESS = ".prepare-progress.json"  # an unfinished prepare's finished shards; gone when done
SHARD_TOKENS = 100_000_000           # train tokens per shard (val: scaled by its fraction)
CHUNK_DOCS, CHUNK_CHARS = 256, 4_000_000  # documents per tokenization task, at most
NEW_REQUEST_KEYS = ("max_tokens", "shard_tokens")  # absent from format-1 requests


# -- prepare -------------------------------------------------------------------------------------
def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


class _ShardWriter:
    """Appends one split's documents to shards of >= shard_tokens tokens (cut between
    documents). A shard is written as a hidden .partial file and renamed once complete."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int,
                 shards: list[dict[str, Any]], next_item: int) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards, self.next_item = list(shards), next_item  # next_item: first unrecorded
        self._file: Any = None
        self._tmp = Path()
        self._tokens = self._bytes = self._docs = self._max = 0

    @property
    def total_tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self._tokens

    @property
    def documents(self) -> int:
        return sum(s["documents"] for s in self.shards) + self._docs

    def add(self, item: int, ids: np.ndarray, n_bytes: int) -> bool:
        """Append a document (item = its index in the corpus); True when a shard completed."""
        if self._file is None:
            self._tmp = self.out / f".{shard_name(self.split, len(self.shards))}.partial"
            self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in _commit / discard
        ids.astype(self.dtype, copy=False).tofile(self._file)
        self._tokens += len(ids)
        self._bytes += n_bytes
        self._docs += 1
        self._max = max(self._max, int(ids.max()) if len(ids) else 0)
        if self._tokens >= self.shard_tokens:
            self._commit(item)
            return True
        return False

    def finish(self, last_item: int) -> None:
        if self._file is not None and self._docs:
            self._commit(last_item)

    def _commit(self, last_item: int) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        name = shard_name(self.split, len(self.shards))
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, self.out / name)
        self.shards.append({"file": name, "tokens": self._tokens, "bytes": self._bytes,
                            "documents": self._docs, "max_id": self._max})
        self.next_item = last_item + 1
        self._tokens = self._bytes = self._docs = self._max = 0

    def discard(self) -> None:
        """Drop the open (partial) shard: a rerun regenerates it from its first document."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._tmp.unlink(missing_ok=True)
        self._tokens = self._bytes = self._docs = self._max = 0

    def state(self) -> dict[str, Any]:
        return {"shards": self.shards, "next_item": self.next_item,
                "shard_tokens": self.shard_tokens}

    def summary(self) -> dict[str, Any]:
        return {"tokens": sum(s["tokens"] for s in self.shards),
                "bytes": sum(s["bytes"] for s in self.shards),
                "documents": sum(s["documents"] for s in self.shards),
                "shard_tokens": self.shard_tokens, "shards": self.shards}


# Tokenization workers (spawned: the parent may hold JAX's threads, which fork would copy).
_WORKER_TOKENIZER: Tokenizer | None = None


def _worker_init(spec: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(spec)


def _encode_texts(tok: Tokenizer, texts: list[str], eot: int | None, dtype: np.dtype
                  ) -> list[tuple[np.ndarray, int]]:
    tail = [] if eot is None else [eot]
    return [(np.asarray(ids + tail, dtype=dtype), len(text.encode("utf-8")))
            for text, ids in zip(texts, tok.encode_batch(texts), strict=True)]


def _worker_encode(texts: list[str], eot: int | None, dtype: str
                   ) -> list[tuple[np.ndarray, int]]:
    assert _WORKER_TOKENIZER is not None
    return _encode_texts(_WORKER_TOKENIZER, texts, eot, np.dtype(dtype))


class _Encoder:
    """Tokenize chunks in order: in this process (workers=0) or in a spawned Pool, keeping at
    most 2 * workers + 2 chunks in flight so a streamed corpus is never read far ahead."""

    def __init__(self, tok: Tokenizer, spec: str, workers: int, eot: int | None,
                 dtype: np.dtype) -> None:
        self.tok, self.workers, self.eot, self.dtype = tok, workers, eot, dtype
        self.pool = (multiprocessing.get_context("spawn").Pool(
            workers, initializer=_worker_init, initargs=(spec,)) if workers > 0 else None)

    def map(self, chunks: Iterable[tuple[Any, list[str]]]
            ) -> Iterator[tuple[Any, list[tuple[np.ndarray, int]]]]:
        if self.pool is None:
            for tag, texts in chunks:
                yield tag, _encode_texts(self.tok, texts, self.eot, self.dtype)
            return
        window: collections.deque[tuple[Any, Any]] = collections.deque()
        for tag, texts in chunks:
            window.append((tag, self.pool.apply_async(_worker_encode,
                                                      (texts, self.eot, self.dtype.name))))
            if len(window) >= 2 * self.workers + 2:
                tag0, res = window.popleft()
                yield tag0, res.get()
        while window:
            tag0, res = window.popleft()
            yield tag0, res.get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _chunks(items: Iterable[tuple[int, str, str]]) -> Iterator[tuple[list[tuple[int, str]],
                                                                      list[str]]]:
    """(index, split, text) items -> ([(index, split)], [text]) groups for one task each."""
    tags: list[tuple[int, str]] = []
    texts: list[str] = []
    chars = 0
    for index, split, text in items:
        tags.append((index, split))
        texts.append(text)
        chars += len(text)
        if len(texts) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
            yield tags, texts
            tags, texts, chars = [], [], 0
    if texts:
        yield tags, texts


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def split_shard_tokens(shard_tokens: int, val_fraction: float) -> dict[str, int]:
    """Val shards are scaled by val/train so both splits finish shards at the same pace (a
    resumed prepare then restarts from nearly where it stopped)."""
    ratio = val_fraction / (1 - val_fraction) if val_fraction < 1 else 1.0
    return {"train": shard_tokens, "val": max(1, round(shard_tokens * ratio))}


def prepare(source: str, tokenizer_spec: str, out_dir: str | Path, *, sp_vocab_size: int = 4096,
            val_fraction: float = 0.05, text_field: str = "text",
            max_documents: int | None = None, max_tokens: int | None = None,
            shard_tokens: int = SHARD_TOKENS, workers: int = 0, overwrite: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """Tokenize a corpus into out_dir/{train,val}_NNNNN.bin + meta.json; returns the meta.

    tokenizer_spec: 'sentencepiece' (train one on the train documents, cached as
    out_dir/tokenizer.model and reused if present), 'sentencepiece:PATH' (copied into out_dir so
    the directory is self-contained) or 'tiktoken:NAME'. Every round(1/val_fraction)-th document
    goes to val; a corpus with fewer documents gives val the tail of its last document instead.
    max_tokens stops after the train document that reaches that many train tokens (val keeps
    the documents before it). workers > 0 tokenizes in that many processes (same output).
    Re-running with the same arguments returns the existing meta, or continues an interrupted
    run; different arguments are refused unless overwrite=True.
    """
    if not 0.0 <= val_fraction <= 0.5:
        raise ValueError(f"val_fraction must lie in [0, 0.5]; got {val_fraction}")
    if int(shard_tokens) < 1 or (max_tokens is not None and int(max_tokens) < 1):
        raise ValueError(f"shard_tokens and max_tokens must be >= 1; got {shard_tokens}, "
                         f"{max_tokens}")
    max_tokens = None if max_tokens is None else int(max_tokens)
    out = Path(out_dir)
    if tokenizer_spec.startswith("sentencepiece:"):  # a path: compare reruns by where it points
        tokenizer_spec = f"sentencepiece:{Path(tokenizer_spec[14:]).expanduser().resolve()}"
    request = {"source": canonical_source(source), "tokenizer": tokenizer_spec,
               "sp_vocab_size": sp_vocab_size if tokenizer_spec == "sentencepiece" else None,
               "val_fraction": val_fraction, "text_field": text_field,
               "max_documents": max_documents, "max_tokens": max_tokens,
               "shard_tokens": int(shard_tokens)}

    def docs() -> Iterator[tuple[str, str]]:
        texts = itertools.islice(iter_documents(source, text_field=text_field), max_documents)
        return _assign_splits(texts, val_fraction)

    existing = _existing(out, request, overwrite)
    if existing is not None:
        return existing
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        _clear(out)  # a crash from here on leaves no stale meta or shards behind
    train_texts = (text for split, text in docs() if split == "train")
    tok, resolved = _resolve_tokenizer(tokenizer_spec, out, sp_vocab_size, train_texts, overwrite)
    dtype, eot = token_dtype(tok.vocab_size), tok.eot_id
    saved = _load_progress(out, tok.fingerprint, dtype)
    sizes = split_shard_tokens(int(shard_tokens), val_fraction)
    writers = {s: _ShardWriter(out, s, dtype, sizes[s], saved[s]["shards"], saved[s]["next_item"])
               for s in SPLITS}

    def record() -> None:
        state = {"request": request, "tokenizer_fingerprint": tok.fingerprint,
                 "splits": {s: w.state() for s, w in writers.items()}}
        write_atomic(out / PROGRESS, (json.dumps(state, indent=1) + "\n").encode())

    record()
    worker_spec = f"sentencepiece:{out / CACHED_SP}" if resolved.startswith("sentencepiece:") \
        else resolved
    encoder = _Encoder(tok, worker_spec, workers, eot, dtype)
    try:
        with tqdm(desc=f"tokenizing {source}", unit="tok", unit_scale=True, total=max_tokens,
                  initial=writers["train"].total_tokens, disable=not progress) as bar:
            last = _tokenize_into(docs(), writers, encoder, max_tokens, record, bar)
        for w in writers.values():
            w.finish(last)
        if not writers["train"].documents:
            raise ValueError(f"source {source!r} yielded no documents")
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    finally:
        encoder.close()
    meta = {"format_version": FORMAT_VERSION, "source": request["source"], "tokenizer": resolved,
            "tokenizer_fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
            "eot_id": eot, "dtype": dtype.name,
            "splits": {s: w.summary() for s, w in writers.items()}, "request": request,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    write_atomic(out / META, (json.dumps(meta, indent=2) + "\n").encode())
    (out / PROGRESS).unlink(missing_ok=True)
    return meta


def _tokenize_into(docs: Iterable[tuple[str, str]], writers: dict[str, _ShardWriter],
                   encoder: _Encoder, max_tokens: int | None, record: Any, bar: tqdm) -> int:
    """Stream (split, text) items into the writers; returns the last item index used.

    Items already inside a finished shard of their split are skipped untokenized, so a resumed
    run starts tokenizing at the first document of the earliest unfinished shard.
    """
    train = writers["train"]
    restart = min(w.next_item for w in writers.values())
    # Where max_tokens stops: the train item that reached it (known already if a finished
    # shard reached it), so a resumed run stops exactly where an uninterrupted one does.
    stop_after = (train.next_item - 1 if max_tokens is not None and train.shards
                  and train.total_tokens >= max_tokens else None)

    def todo() -> Iterator[tuple[int, str, str]]:
        for index, (split, text) in enumerate(docs):
            if stop_after is not None and index > stop_after:
                return
            if index >= restart and index >= writers[split].next_item:
                yield index, split, text

    last = -1
    for tags, encoded in encoder.map(_chunks(todo())):
        for (index, split), (ids, n_bytes) in zip(tags, encoded, strict=True):
            if stop_after is not None and index > stop_after:
                return last
            if writers[split].add(index, ids, n_bytes):
                record()
            last = index
            if split == "train":
                bar.update(len(ids))
                if max_tokens is not None and stop_after is None and train.total_tokens >= max_tokens:
                    stop_after = index
        bar.set_postfix(docs=sum(w.documents for w in writers.values()),
                        shards=sum(len(w.shards) for w in writers.values()), refresh=False)
    return last


def _shard_files(out: Path) -> list[Path]:
    """Token files of any format in out: {split}.bin (format 1) and {split}_NNNNN.bin."""
    return sorted(p for s in SPLITS for p in out.glob(f"{s}*.bin") if p.is_file())


def _clear(out: Path) -> None:
    (out / META).unlink(missing_ok=True)
    (out / PROGRESS).unlink(missing_ok=True)
    for p in _shard_files(out) + sorted(out.glob(".*.partial")):
        p.unlink()


def _load_progress(out: Path, fingerprint: str, dtype: np.dtype) -> dict[str, dict[str, Any]]:
    """The finished shards of an interrupted prepare (verified), or a fresh start.

    Any shard file not recorded as finished, and any partial file, is deleted here: it is
    regenerated, byte for byte, from its first document.
    """
    fresh = {s: {"shards": [], "next_item": 0} for s in SPLITS}
    path = out / PROGRESS
    state = json.loads(path.read_text()) if path.exists() else None
    if state is not None and state.get("tokenizer_fingerprint") != fingerprint:
        raise FileExistsError(f"{path} records an interrupted prepare with another tokenizer "
                              f"vocabulary; pass overwrite=True to start over")
    splits = fresh if state is None else state["splits"]
    keep = set()
    for s in SPLITS:
        for shard in splits[s]["shards"]:
            f = out / shard["file"]
            size = f.stat().st_size if f.exists() else None
            if size != shard["tokens"] * dtype.itemsize:
                raise FileExistsError(f"{f} is recorded as finished in {path} but is missing or "
                                      "damaged; pass overwrite=True to start over")
            keep.add(f.name)
    for p in _shard_files(out) + sorted(out.glob(".*.partial")):
        if p.name not in keep:
            p.unlink()
    return splits


def _assign_splits(texts: Iterable[str], val_fraction: float) -> Iterator[tuple[str, str]]:
    """Every round(1/val_fraction)-th document to val; too few documents: the last one's tail."""
    every = round(1 / val_fraction) if val_fraction > 0 else 0
    last: tuple[str, str] | None = None
    total_chars, any_val = 0, False
    for i, text in enumerate(texts):  # one document held back, in case its tail must be val
        if last is not None:
            yield last
        last = ("val" if every and i % every == every - 1 else "train", text)
        any_val, total_chars = any_val or last[0] == "val", total_chars + len(text)
    if last is None:
        return
    if any_val or not every or len(last[1]) < 2:
        yield last
        return
    text = last[1]
    cut = min(max(1, len(text) - int(val_fraction * total_chars)), len(text) - 1)
    newline = text.find("\n", cut)  # start val at a line start where there is one
    cut = newline + 1 if 0 <= newline < len(text) - 1 else cut
    yield from (("train", text[:cut]), ("val", text[cut:]))


def _request_diffs(old: dict[str, Any], request: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (old.get(k), v) for k, v in request.items()
            if old.get(k) != v and not (k in NEW_REQUEST_KEYS and k not in old)}


def _existing(out: Path, request: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The meta of identical prepared data in out (an idempotent rerun), else None (prepare,
    or continue an interrupted prepare of the same request).

    Raises instead of returning None when out holds other prepared data (unless overwrite).
    """
    if overwrite:
        return None
    if not (out / META).exists():
        if (out / PROGRESS).exists():
            old = json.loads((out / PROGRESS).read_text()).get("request", {})
            if diffs := _request_diffs(old, request):
                said = "; ".join(f"{k}: interrupted run {a!r}, requested {b!r}"
                                 for k, (a, b) in diffs.items())
                raise FileExistsError(f"{out} holds an interrupted prepare made differently "
                                      f"({said}); rerun it with its own arguments to finish it, "
                                      "use another directory, or pass overwrite=True")
            return None
        stale = [p.name for p in _shard_files(out)]
        if stale:
            raise FileExistsError(f"{out} holds {', '.join(stale[:4])} but no {META} (an "
                                  "interrupted or foreign prepare); pass overwrite=True to "
                                  "replace them")
        return None
    meta = load_meta(out)
    diffs = _request_diffs(meta.get("request", {}), request)
    if not diffs:
        spec = request["tokenizer"]
        current = (load_tokenizer_for(out, check=False) if spec == "sentencepiece"
                   else load_tokenizer(spec)).fingerprint
        if current != meta["tokenizer_fingerprint"]:
            diffs["tokenizer_fingerprint"] = (meta["tokenizer_fingerprint"], current)
    if diffs:
        said = "; ".join(f"{k}: existing {a!r}, requested {b!r}" for k, (a, b) in diffs.items())
        raise FileExistsError(f"{out} already holds prepared data made differently ({said}); "
                              "use another directory or pass overwrite=True to replace it")
    for split in SPLITS:
        load_split(out, split)  # file sizes must still match the meta
    return meta


def _resolve_tokenizer(spec: str, out: Path, sp_vocab_size: int, train_docs: Iterator[str],
                       overwrite: bool) -> tuple[Tokenizer, str]:
    """Load, copy or train the tokenizer; returns it and the spec meta.json records."""
    cached = out / CACHED_SP
    resolved = f"sentencepiece:{CACHED_SP}"  # relative to the data directory
    if spec == "sentencepiece":
        if overwrite or not cached.exists():
            train_sentencepiece(train_docs, sp_vocab_size, out / Path(CACHED_SP).stem,
                                overwrite=True)
        tok = load_tokenizer(f"sentencepiece:{cached}")
        if tok.vocab_size != sp_vocab_size:
            raise FileExistsError(f"{cached} has vocab_size {tok.vocab_size}, not the requested "
                                  f"{sp_vocab_size}; pass overwrite=True to retrain it")
        return tok, resolved
    tok = load_tokenizer(spec)
    if not spec.startswith("sentencepiece:"):
        return tok, spec
    src = Path(spec.partition(":")[2]).expanduser()
    if cached.exists():
        if cached.samefile(src):
            return tok, resolved
        theirs = load_tokenizer(f"sentencepiece:{cached}").fingerprint
        if not overwrite and theirs != tok.fingerprint:
            raise FileExistsError(f"{cached} holds a different sentencepiece model than {spec!r}; "
                                  "pass overwrite=True to replace it")
    write_atomic(cached, src.read_bytes())
    return tok, resolved


# -- reading -------------------------------------------------------------------------------------
def load_meta(data_dir: str | Path) -> dict[str, Any]:
    """meta.json of a prepared directory, with errors that say what to run."""
    path = Path(data_dir) / META
    if not path.is_file():
        hint = (f" ({PROGRESS} is there: a prepare was interrupted; rerun it to finish)"
                if (Path(data_dir) / PROGRESS).exists() else "")
        raise FileNotFoundError(f"no {META} in {data_dir}{hint}: prepare it first, e.g. `python -m "
                                f"kronjax.data prepare --source shakespeare --out {data_dir}`")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt (not JSON: {e}); re-run prepare with overwrite") from e
    need = ("format_version", "tokenizer", "tokenizer_fingerprint", "vocab_size", "dtype", "splits")
    missing = [k for k in need if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"{path} lacks {missing}; re-run prepare with overwrite")
    if meta["format_version"] not in READ_VERSIONS:
        raise ValueError(f"{path} has format_version {meta['format_version']}, this code reads "
                         f"{READ_VERSIONS}; re-run prepare with overwrite")
    return meta


def load_tokenizer_for(data_dir: str | Path, *, check: bool = True) -> Tokenizer:
    """The tokenizer a directory was prepared with (relative sp paths resolve against it)."""
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    scheme, _, arg = meta["tokenizer"].partition(":")
    tok = load_tokenizer(f"sentencepiece:{data_dir / arg}" if scheme == "sentencepiece"
                         else meta["tokenizer"])
    if check and tok.fingerprint != meta["tokenizer_fingerprint"]:
        raise ValueError(f"tokenizer {meta['tokenizer']!r} no longer matches the fingerprint "
                         f"recorded in {data_dir / META}: the data was made with another "
                         "vocabulary")
    return tok


class ShardedTokens:
    """Read-only 1-D view of a split's shards, end to end: len(), slices (copied out of the
    memmaps they touch, across shard boundaries), np.asarray. Pickles as file paths."""

    ndim = 1

    def __init__(self, parts: list[np.ndarray]) -> None:
        if not parts:
            raise ValueError("ShardedTokens needs at least one shard")
        self.parts = parts
        self.dtype = parts[0].dtype
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return np.asarray(self)[key]
            if stop <= start:
                return np.zeros(0, self.dtype)
            first = int(np.searchsorted(self.offsets, start, side="right")) - 1
            pieces = []
            for i in range(first, len(self.parts)):
                lo = int(self.offsets[i])
                if lo >= stop:
                    break
                pieces.append(self.parts[i][max(start - lo, 0):stop - lo])
            return np.concatenate(pieces) if len(pieces) > 1 else np.array(pieces[0])
        index = int(key) + (len(self) if int(key) < 0 else 0)
        if not 0 <= index < len(self):
            raise IndexError(f"index {key} out of range for {len(self)} tokens")
        i = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[i][index - int(self.offsets[i])]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.concatenate(self.parts)
        return out if dtype is None else out.astype(dtype)

    def __getstate__(self) -> dict[str, Any]:
        return {"files": [(p.filename, p.dtype.str) if isinstance(p, np.memmap) else p
                          for p in self.parts]}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__([np.memmap(p[0], dtype=np.dtype(p[1]), mode="r") if isinstance(p, tuple)
                       else p for p in state["files"]])


def split_shards(meta: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """A split's shard records; format 1 had one {split}.bin per split."""
    info = meta["splits"][split]
    if "shards" in info:
        return list(info["shards"])
    return [{"file": f"{split}.bin", "tokens": int(info["tokens"])}]


def load_split(data_dir: str | Path, split: str, *, vocab_size: int | None = None
               ) -> np.ndarray | ShardedTokens:
    """A split's tokens: one read-only np.memmap if it has one shard, else a ShardedTokens over
    all of them (an empty ndarray if the split has no tokens).

    Checks each shard's size against meta.json, and with vocab_size that every id fits the model.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    meta = load_meta(data_dir)
    dtype = np.dtype(meta["dtype"])
    parts: list[np.ndarray] = []
    max_id = -1
    for shard in split_shards(meta, split):
        path, n_tokens = Path(data_dir) / shard["file"], int(shard["tokens"])
        size = path.stat().st_size if path.exists() else None
        if size != n_tokens * dtype.itemsize:
            raise ValueError(f"{path} holds {size} bytes but {META} records {n_tokens} "
                             f"{dtype.name} tokens ({n_tokens * dtype.itemsize} bytes): missing, "
                             "truncated or overwritten; re-run prepare with overwrite=True")
        if not n_tokens:
            continue
        tokens_N = np.memmap(path, dtype=dtype, mode="r")
        parts.append(tokens_N)
        if vocab_size is not None:
            if "max_id" in shard:
                max_id = max(max_id, int(shard["max_id"]))
            else:
                chunk = 1 << 24
                max_id = max([max_id] + [int(tokens_N[i:i + chunk].max())
                                         for i in range(0, n_tokens, chunk)])
    if vocab_size is not None and max_id >= vocab_size:
        raise ValueError(f"{Path(data_dir)} {split} holds token id {max_id} but the model's "
                         f"vocab_size is {vocab_size}; the data was tokenized with "
                         f"{meta['tokenizer']!r} (vocab_size {meta['vocab_size']}): set the "
                         f"model's vocab_size >= {max_id + 1}")
    if not parts:
        return np.zeros(0, dtype)
    return parts[0] if len(parts) == 1 else ShardedTokens(parts)
