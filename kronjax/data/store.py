"""The prepared-data format on disk, and reading it back.

A prepared directory holds each split as shards train_00000.bin, train_00001.bin, ... (flat
token ids, documents separated by the tokenizer's end-of-text id) and meta.json: tokenizer
fingerprint, per-split and per-shard token counts, UTF-8 byte counts (for bits per byte).
`load_split` reads a split's shards as one token sequence (`ShardedTokens`). Format 1 (one
{split}.bin per split, written before sharding existed) is still read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kronjax.data.tokenizers import Tokenizer, load_tokenizer
from kronjax.errors import UserError

FORMAT_VERSION = 2  # 2: sharded splits; 1 (one {split}.bin per split) is still read
READ_VERSIONS = (1, 2)
SPLITS = ("train", "val")
CACHED_SP = "tokenizer.model"
META = "meta.json"
PROGRESS = ".prepare-progress.json"  # an unfinished prepare's finished shards; gone when done
SHARD_TOKENS = 100_000_000           # train tokens per shard (val: scaled by its fraction)


class DataError(UserError):
    """A prepared directory or source that cannot be trained on as it is."""


class DataMismatchError(DataError, FileExistsError):
    """A directory already holds data prepared from another request or other source content
    (a FileExistsError too, as these refusals were before they were UserErrors)."""


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


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


def _check_ids(tokens_N: np.ndarray, vocab_size: int, path: Path, meta: dict[str, Any]) -> None:
    """Every id of a shard is < vocab_size, read from the file itself (meta.json's max_id
    says what was written, not what is there now): an id out of range made the loss NaN at
    some later step. Reads the shard once, in chunks (about 1 s per GB from the page cache)."""
    chunk = 1 << 24
    for start in range(0, len(tokens_N), chunk):
        part = np.asarray(tokens_N[start:start + chunk])
        if int(part.max()) >= vocab_size:
            off = start + int(np.argmax(part >= vocab_size))
            raise DataError(
                f"{path} holds token id {int(part[off - start])} at token offset {off} (byte "
                f"{off * tokens_N.dtype.itemsize}) but the model's vocab_size is {vocab_size}; "
                f"the data was tokenized with {meta['tokenizer']!r} (vocab_size "
                f"{meta['vocab_size']}): a corrupt file, or data for another tokenizer "
                "(re-run prepare with overwrite=True)")


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
            _check_ids(tokens_N, vocab_size, path, meta)
    if not parts:
        return np.zeros(0, dtype)
    return parts[0] if len(parts) == 1 else ShardedTokens(parts)
