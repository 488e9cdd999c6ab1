"""Writing a split's shards: token ids appended document by document, in worker processes.

A shard is written as a hidden .partial file and renamed once complete, so a directory never
holds a partial shard under its final name; `Encoder` tokenizes in spawned processes, in order.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kronjax.data.store import DataError, shard_name
from kronjax.data.tokenizers import Tokenizer, load_tokenizer
from kronjax.errors import os_reason
from kronjax.files import commit

CHUNK_DOCS, CHUNK_CHARS = 256, 4_000_000  # documents per tokenization task, at most


class ShardWriter:
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
        try:
            if self._file is None:
                self._tmp = self.out / f".{shard_name(self.split, len(self.shards))}.partial"
                self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in _commit / discard
            # file.write, not ndarray.tofile: a full disk is then an OSError with its errno
            # ("no space left on device"), not numpy's "N requested and M written"
            self._file.write(ids.astype(self.dtype, copy=False).tobytes())
        except OSError as e:
            raise self._write_error(e) from e
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

    def _write_error(self, e: OSError) -> DataError:
        return DataError(f"cannot write {self._tmp}: {os_reason(e)}; free space in {self.out} "
                         "(or prepare elsewhere: --out / data.dir) and rerun the same command: "
                         "finished shards are kept")

    def _commit(self, last_item: int) -> None:
        name = shard_name(self.split, len(self.shards))
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            commit(self._tmp, self.out / name)
        except OSError as e:
            raise self._write_error(e) from e
        self.shards.append({"file": name, "tokens": self._tokens, "bytes": self._bytes,
                            "documents": self._docs, "max_id": self._max})
        self.next_item = last_item + 1
        self._tokens = self._bytes = self._docs = self._max = 0

    def discard(self) -> None:
        """Drop the open (partial) shard: a rerun regenerates it from its first document."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # the full disk that stopped the run: its error is the one said
                pass
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


class Encoder:
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


def chunks(items: Iterable[tuple[int, str, str]]) -> Iterator[tuple[list[tuple[int, str]],
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

