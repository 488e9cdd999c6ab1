"""`prepare`: a corpus -> a prepared directory (kronjax.data.store's format), resumably.

`prepare` streams a corpus (kronjax.data.corpora), tokenizes it in worker processes (order
kept) and writes each split's shards (kronjax.data.writer) plus meta.json. A prepare that is
interrupted continues when rerun with the same arguments: finished shards are recorded
atomically (in .prepare-progress.json, removed once meta.json is written) and never
rewritten; a partial shard is discarded and regenerated identically from its first document.
"""

from __future__ import annotations

import datetime
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from kronjax.data.corpora import canonical_source, iter_documents
from kronjax.data.store import (CACHED_SP, FORMAT_VERSION, META, PROGRESS, SHARD_TOKENS, SPLITS,
                                DataError, load_meta, load_split, load_tokenizer_for, token_dtype)
from kronjax.data.tokenizers import Tokenizer, load_tokenizer, train_sentencepiece
from kronjax.data.writer import _chunks, _Encoder, _ShardWriter
from kronjax.files import write_atomic

NEW_REQUEST_KEYS = ("max_tokens", "shard_tokens")  # absent from format-1 requests


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
    if next(iter(docs()), None) is None:  # before a directory or a tokenizer is made
        raise DataError(f"source {source!r} holds no text (an empty file or folder?): "
                        "nothing to tokenize")
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
