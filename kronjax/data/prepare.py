"""`prepare`: a corpus -> a prepared directory (kronjax.data.store's format), resumably.

`prepare` streams a corpus (kronjax.data.corpora), tokenizes it in worker processes (order
kept) and writes each split's shards (kronjax.data.writer) plus meta.json. A prepare that is
interrupted continues when rerun with the same arguments: finished shards are recorded
atomically (in .prepare-progress.json, removed once meta.json is written) and never
rewritten; a partial shard is discarded and regenerated identically from its first document.

What defines the data is recorded and checked on every rerun: the request (resolved source,
tokenizer spec, vocabulary size, max_tokens, split settings) and, for local files, each file's
size, mtime and SHA-256 (`source_content`). A rerun asking for other data, or over a source
whose content changed since, is refused naming what differs (`DataMismatchError`); a split
that would come out empty is refused before anything is written. Directories written before
`source_content` existed are used as they are, with a warning that the source cannot be
checked; so is a directory whose local source no longer exists.
"""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from kronjax import storage
from kronjax.data import remote
from kronjax.data.corpora import canonical_source, iter_documents
from kronjax.data.fingerprint import (
    CONTENT,
    content_changes,
    defining_request,
    describe_changes,
    is_local,
    source_content,
)
from kronjax.data.store import (
    CACHED_SP,
    FORMAT_VERSION,
    META,
    PROGRESS,
    SHARD_TOKENS,
    SPLITS,
    DataError,
    DataMismatchError,
    load_meta,
    load_split,
    load_tokenizer_for,
    token_dtype,
)
from kronjax.data.tokenizers import Tokenizer, load_tokenizer, train_sentencepiece
from kronjax.data.writer import Encoder, ShardWriter, chunks
from kronjax.files import write_atomic

log = logging.getLogger("kronjax.data")

NEW_REQUEST_KEYS = ("max_tokens", "shard_tokens")  # absent from format-1 requests


def split_shard_tokens(shard_tokens: int, val_fraction: float) -> dict[str, int]:
    """Val shards are scaled by val/train so both splits finish shards at the same pace (a
    resumed prepare then restarts from nearly where it stopped)."""
    ratio = val_fraction / (1 - val_fraction) if val_fraction < 1 else 1.0
    return {"train": shard_tokens, "val": max(1, round(shard_tokens * ratio))}


def prepare(source: str, tokenizer_spec: str, out_dir: str | Path | Any, *,
            sp_vocab_size: int = 4096,
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
    out_dir may be a gs:// URL: prepared in this host's cache, then published there
    (kronjax.data.remote). Re-running with the same arguments returns the existing meta, or
    continues an interrupted run; different arguments are refused unless overwrite=True.
    """
    if not 0.0 <= val_fraction <= 0.5:
        raise ValueError(f"val_fraction must lie in [0, 0.5]; got {val_fraction}")
    if int(shard_tokens) < 1 or (max_tokens is not None and int(max_tokens) < 1):
        raise ValueError(f"shard_tokens and max_tokens must be >= 1; got {shard_tokens}, "
                         f"{max_tokens}")
    max_tokens = None if max_tokens is None else int(max_tokens)
    request = {**defining_request(source, tokenizer_spec, sp_vocab_size=sp_vocab_size,
                                  max_tokens=max_tokens, strict=False),
               "val_fraction": val_fraction, "text_field": text_field,
               "max_documents": max_documents, "shard_tokens": int(shard_tokens)}
    if storage.is_url(out_dir):  # prepared in this host's cache, then published
        return remote.prepare_in_bucket(
            out_dir, request, overwrite, _request_diffs,
            lambda local: prepare(source, tokenizer_spec, local, sp_vocab_size=sp_vocab_size,
                                  val_fraction=val_fraction, text_field=text_field,
                                  max_documents=max_documents, max_tokens=max_tokens,
                                  shard_tokens=shard_tokens, workers=workers,
                                  overwrite=overwrite, progress=progress))
    out = Path(out_dir)
    tokenizer_spec = request["tokenizer"]  # a sentencepiece path: where it points
    gone = is_local(source) and not Path(source).expanduser().exists()

    def docs() -> Iterator[tuple[str, str]]:
        texts = itertools.islice(iter_documents(source, text_field=text_field), max_documents)
        return assign_splits(texts, val_fraction)

    existing = _existing(out, request, overwrite, source, gone)
    if existing is not None:
        return existing
    canonical_source(source)  # a source that is gone (no data from it here) is an error
    if next(iter(docs()), None) is None:  # before a directory or a tokenizer is made
        raise DataError(f"source {source!r} holds no text (an empty file or folder?): "
                        "nothing to tokenize")
    content = source_content(source)
    with tempfile.TemporaryDirectory(prefix="kronjax-prepare-") as scratch:
        # Nothing is written into out before the splits are known to be non-empty: a
        # sentencepiece model is trained in scratch and copied in afterwards.
        train_texts = (text for split, text in docs() if split == "train")
        tok, resolved, model = _resolve_tokenizer(tokenizer_spec, out, sp_vocab_size,
                                                  train_texts, overwrite, Path(scratch))
        _check_splits(docs(), tok, max_tokens, val_fraction, source)
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            _clear(out)  # a crash from here on leaves no stale meta or shards behind
        if model is not None:
            write_atomic(out / CACHED_SP, model.read_bytes())
    dtype, eot = token_dtype(tok.vocab_size), tok.eot_id
    saved = _load_progress(out, tok.fingerprint, dtype)
    sizes = split_shard_tokens(int(shard_tokens), val_fraction)
    writers = {s: ShardWriter(out, s, dtype, sizes[s], saved[s]["shards"], saved[s]["next_item"])
               for s in SPLITS}

    def record() -> None:
        state = {"request": request, "tokenizer_fingerprint": tok.fingerprint,
                 CONTENT: content, "splits": {s: w.state() for s, w in writers.items()}}
        write_atomic(out / PROGRESS, (json.dumps(state, indent=1) + "\n").encode())

    record()
    worker_spec = f"sentencepiece:{out / CACHED_SP}" if resolved.startswith("sentencepiece:") \
        else resolved
    encoder = Encoder(tok, worker_spec, workers, eot, dtype)
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
            CONTENT: content,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    write_atomic(out / META, (json.dumps(meta, indent=2) + "\n").encode())
    (out / PROGRESS).unlink(missing_ok=True)
    return meta


def _tokenize_into(docs: Iterable[tuple[str, str]], writers: dict[str, ShardWriter],
                   encoder: Encoder, max_tokens: int | None, record: Any, bar: tqdm) -> int:
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
    for tags, encoded in encoder.map(chunks(todo())):
        for (index, split), (ids, n_bytes) in zip(tags, encoded, strict=True):
            if stop_after is not None and index > stop_after:
                return last
            if writers[split].add(index, ids, n_bytes):
                record()
            last = index
            if split == "train":
                bar.update(len(ids))
                if (max_tokens is not None and stop_after is None
                        and train.total_tokens >= max_tokens):
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
        raise DataMismatchError(f"{path} records an interrupted prepare with another tokenizer "
                                "vocabulary; pass overwrite=True to start over")
    splits = fresh if state is None else state["splits"]
    keep = set()
    for s in SPLITS:
        for shard in splits[s]["shards"]:
            f = out / shard["file"]
            size = f.stat().st_size if f.exists() else None
            if size != shard["tokens"] * dtype.itemsize:
                raise DataMismatchError(f"{f} is recorded as finished in {path} but is missing "
                                        "or damaged; pass overwrite=True to start over")
            keep.add(f.name)
    for p in _shard_files(out) + sorted(out.glob(".*.partial")):
        if p.name not in keep:
            p.unlink()
    return splits


def assign_splits(texts: Iterable[str], val_fraction: float) -> Iterator[tuple[str, str]]:
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


def _existing(out: Path, request: dict[str, Any], overwrite: bool, source: str,
              gone: bool) -> dict[str, Any] | None:
    """The meta of identical prepared data in out (an idempotent rerun), else None (prepare,
    or continue an interrupted prepare of the same request).

    Raises instead of returning None when out holds other prepared data, or data from other
    content of the same local source (unless overwrite). gone: the local source no longer
    exists; data prepared from it are used as they are, with a warning.
    """
    if overwrite:
        return None
    if not (out / META).exists():
        if (out / PROGRESS).exists():
            progress = json.loads((out / PROGRESS).read_text())
            if diffs := _request_diffs(progress.get("request", {}), request):
                said = "; ".join(f"{k}: interrupted run {a!r}, requested {b!r}"
                                 for k, (a, b) in diffs.items())
                raise DataMismatchError(f"{out} holds an interrupted prepare made differently "
                                        f"({said}); rerun it with its own arguments to finish "
                                        "it, use another directory, or pass overwrite=True")
            if not gone and progress.get(CONTENT) and \
                    (changes := content_changes(progress[CONTENT], source)):
                raise DataMismatchError(f"{out} holds an interrupted prepare of other content "
                                        f"of {request['source']}: {describe_changes(changes)};"
                                        " use another directory, or pass overwrite=True")
            return None
        stale = [p.name for p in _shard_files(out)]
        if stale:
            raise DataMismatchError(f"{out} holds {', '.join(stale[:4])} but no {META} (an "
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
        raise DataMismatchError(f"{out} already holds prepared data made differently ({said}); "
                                "use another directory or pass overwrite=True to replace it")
    if gone:
        log.warning("source %s no longer exists: using the data prepared from it in %s as "
                    "they are", source, out)
    elif is_local(source) and meta.get(CONTENT) is None:
        log.warning("%s records no fingerprint of its source (prepared by an older kronjax): "
                    "whether %s changed since cannot be checked; using it", out, source)
    elif is_local(source) and (changes := content_changes(meta[CONTENT], source)):
        raise DataMismatchError(f"{out} was prepared from other content of {request['source']}: "
                                f"{describe_changes(changes)}; use another directory (data.dir, "
                                "--out) to prepare the current content, or pass overwrite=True "
                                "to replace these data")
    for split in SPLITS:
        load_split(out, split)  # file sizes must still match the meta
    return meta


def _resolve_tokenizer(spec: str, out: Path, sp_vocab_size: int, train_docs: Iterator[str],
                       overwrite: bool, scratch: Path) -> tuple[Tokenizer, str, Path | None]:
    """Load, train (into scratch) or find the tokenizer, writing nothing into out; returns it,
    the spec meta.json records, and the model file to copy into out (None: nothing to copy)."""
    cached = out / CACHED_SP
    resolved = f"sentencepiece:{CACHED_SP}"  # relative to the data directory
    if spec == "sentencepiece":
        model = cached
        if overwrite or not cached.exists():
            model = train_sentencepiece(train_docs, sp_vocab_size, scratch / Path(CACHED_SP).stem,
                                        overwrite=True)
        tok = load_tokenizer(f"sentencepiece:{model}")
        if tok.vocab_size != sp_vocab_size:
            raise DataMismatchError(f"{cached} has vocab_size {tok.vocab_size}, not the "
                                    f"requested {sp_vocab_size}; pass overwrite=True to retrain it")
        return tok, resolved, None if model == cached else model
    tok = load_tokenizer(spec)
    if not spec.startswith("sentencepiece:"):
        return tok, spec, None
    src = Path(spec.partition(":")[2]).expanduser()
    if cached.exists():
        if cached.samefile(src):
            return tok, resolved, None
        theirs = load_tokenizer(f"sentencepiece:{cached}").fingerprint
        if not overwrite and theirs != tok.fingerprint:
            raise DataMismatchError(f"{cached} holds a different sentencepiece model than "
                                    f"{spec!r}; pass overwrite=True to replace it")
    return tok, resolved, src


def _check_splits(items: Iterable[tuple[str, str]], tok: Tokenizer, max_tokens: int | None,
                  val_fraction: float, source: str) -> None:
    """DataError if the val split would come out empty (doc 0 always goes to train). Reads
    the documents up to the first val one, and with max_tokens tokenizes the train documents
    before it (where max_tokens stops, val keeps only the documents before that point)."""
    if val_fraction == 0:  # no val split asked for
        return
    train_tokens, eot = 0, 0 if tok.eot_id is None else 1
    for split, text in items:
        if split == "val":
            return
        if max_tokens is not None:
            train_tokens += len(tok.encode_batch([text])[0]) + eot
            if train_tokens >= max_tokens:
                raise DataError(
                    f"the val split would be empty: max_tokens {max_tokens} stops {source!r} "
                    f"after {train_tokens} train tokens, before the first val document (every "
                    f"{round(1 / val_fraction)}th document goes to val, or the tail of the last "
                    "one if there are fewer); raise max_tokens or use more, shorter documents")
    raise DataError(f"the val split would be empty: {source!r} has too little text to split "
                    "off a val document")
