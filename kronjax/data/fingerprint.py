"""What defines prepared data, and whether a source still holds what was prepared from it.

`defining_request` (resolved source, tokenizer spec, trained vocabulary size, max_tokens) and
its short hash `cache_key`, which names the trainer's cache directories; `source_content`, the
size, mtime and SHA-256 of each file of a local source, recorded in meta.json by
`kronjax.data.prepare` and compared by `content_changes` (only files whose mtime moved are
hashed again). Builtin and hf: sources are defined by their name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kronjax.data.corpora import BUILTIN_SOURCES, canonical_source, local_files
from kronjax.data.store import META

__all__ = ["CONTENT", "DEFINING_KEYS", "cache_key", "content_changes", "defining_request",
           "describe_changes", "holds_request", "is_local", "local_source_bytes",
           "source_content"]

DEFINING_KEYS = ("source", "tokenizer", "sp_vocab_size", "max_tokens")  # a cache's name keys
CONTENT = "source_content"  # [[file, bytes, mtime_ns, sha256], ...] of a local source, or None


def is_local(source: str) -> bool:
    return source not in BUILTIN_SOURCES and not source.startswith("hf:")


def defining_request(source: str, tokenizer_spec: str, *, sp_vocab_size: int,
                     max_tokens: int | None, strict: bool = True) -> dict[str, Any]:
    """What defines prepared data beyond the split settings: the resolved source, the
    tokenizer spec (a sentencepiece path resolved), the vocabulary size of a sentencepiece
    trained on the data, max_tokens. strict=False resolves a local source that does not
    exist (any more) as a path instead of refusing it."""
    if tokenizer_spec.startswith("sentencepiece:"):  # a path: compare reruns by where it points
        tokenizer_spec = f"sentencepiece:{Path(tokenizer_spec[14:]).expanduser().resolve()}"
    gone = is_local(source) and not Path(source).expanduser().exists()
    return {"source": str(Path(source).expanduser().resolve()) if gone and not strict
            else canonical_source(source), "tokenizer": tokenizer_spec,
            "sp_vocab_size": sp_vocab_size if tokenizer_spec == "sentencepiece" else None,
            "max_tokens": None if max_tokens is None else int(max_tokens)}


def cache_key(request: dict[str, Any]) -> str:
    """A short hash of a request's DEFINING_KEYS: the suffix of its cache directory's name."""
    text = json.dumps({k: request.get(k) for k in DEFINING_KEYS}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def holds_request(out: str | Path, request: dict[str, Any]) -> bool:
    """Whether out holds finished data prepared for request's DEFINING_KEYS (a request
    written before max_tokens existed had none)."""
    try:
        old = json.loads((Path(out) / META).read_text()).get("request", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(old, dict) and all(old.get(k) == request.get(k) for k in DEFINING_KEYS)


def local_source_bytes(source: str) -> int | None:
    """Total size of a local source's files; None for builtin, hf: or missing sources."""
    if not is_local(source) or not Path(source).expanduser().exists():
        return None
    return sum(f.stat().st_size for f in local_files(source))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _named_files(source: str) -> dict[str, Path]:
    """A local source's files by name: relative to the source directory, or the file's."""
    root = Path(source).expanduser()
    return {(f.name if root.is_file() else str(f.relative_to(root))): f
            for f in local_files(source)}


def source_content(source: str) -> list[list[Any]] | None:
    """[name, bytes, mtime_ns, sha256] of each file of a local source; None for builtin and
    hf: sources, which their name defines."""
    if not is_local(source):
        return None
    return [[name, f.stat().st_size, f.stat().st_mtime_ns, _sha256(f)]
            for name, f in _named_files(source).items()]


def content_changes(recorded: list[list[Any]], source: str) -> list[str]:
    """How a local source differs from `recorded` (its source_content when prepared). Only a
    file whose size is unchanged but whose mtime is not is read again (and hashed)."""
    now, old = _named_files(source), {r[0]: r for r in recorded}
    changes = [f"{n} removed" for n in sorted(set(old) - set(now))]
    changes += [f"{n} added" for n in sorted(set(now) - set(old))]
    for name in sorted(set(old) & set(now)):
        _, size, mtime, digest = old[name]
        st = now[name].stat()
        if st.st_size != size:
            changes.append(f"{name} ({size} -> {st.st_size} bytes)")
        elif st.st_mtime_ns != mtime and _sha256(now[name]) != digest:
            changes.append(f"{name} (same size, other content)")
    return changes


def describe_changes(changes: list[str]) -> str:
    more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
    return f"source content changed: {'; '.join(changes[:3])}{more}"
