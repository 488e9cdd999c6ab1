"""Exact bytes for every token id, truncated to pos_dim; coverage, collisions, fingerprint.

A token's codec row must come from its exact bytes. Decoding a single id to str and
re-encoding collapses every partial-UTF-8 token to U+FFFD (the PyTorch package does this),
so the adapters here read raw bytes from the tokenizer instead.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import zipfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kronjax.codec import CHAR_DIM, EPS
from kronjax.files import atomic_path

_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SP_SPACE = "\u2581"
FORMAT_VERSION = 1


def truncate(token: bytes, pos_dim: int) -> bytes:
    """Cut to at most pos_dim bytes, never splitting a UTF-8 character of valid UTF-8.

    Bytes that are not valid UTF-8 (partial characters, raw binary) are cut plainly.
    """
    if len(token) <= pos_dim:
        return token
    try:
        token.decode("utf-8")
    except UnicodeDecodeError:
        return token[:pos_dim]
    end = pos_dim
    while end > 0 and (token[end] & 0xC0) == 0x80:  # token[end] continues a character
        end -= 1
    return token[:end]


def encode_bytes(tokens: Sequence[bytes], pos_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte strings -> (rows (N, P) uint8, lengths (N,) int16), truncated per `truncate`."""
    rows = np.zeros((len(tokens), pos_dim), np.uint8)
    lengths = np.zeros((len(tokens),), np.int16)
    for i, tok in enumerate(tokens):
        if not isinstance(tok, (bytes, bytearray)):
            raise TypeError(f"token {i} must be bytes, got {type(tok).__name__}")
        cut = truncate(bytes(tok), pos_dim)
        rows[i, :len(cut)] = np.frombuffer(cut, np.uint8)
        lengths[i] = len(cut)
    return rows, lengths


@dataclasses.dataclass(frozen=True, eq=False)
class ByteVocab:
    """Per-id byte rows for the codec. Hashable by fingerprint so Flax modules can hold it."""

    rows: np.ndarray          # (V, pos_dim) uint8, zero past the length
    lengths: np.ndarray       # (V,) int16, after truncation
    full_lengths: np.ndarray  # (V,) int32, before truncation (-1 for padding / unassigned ids)
    source: str = "bytes"

    def __post_init__(self) -> None:
        if self.rows.ndim != 2 or self.rows.dtype != np.uint8:
            raise ValueError(
                f"rows must be (V, pos_dim) uint8; got {self.rows.shape} {self.rows.dtype}")
        n_rows = self.rows.shape[:1]
        if self.lengths.shape != n_rows or self.full_lengths.shape != n_rows:
            raise ValueError("lengths and full_lengths must be (V,) like rows")
        if self.rows.shape[0] == 0:  # caught here, not later inside a gather
            raise ValueError(f"a vocabulary needs at least one token; got none from "
                             f"{self.source!r} (an empty tokenizer or byte list)")
        if self.lengths.size and (self.lengths.min() < 0 or self.lengths.max() > self.pos_dim):
            raise ValueError(f"lengths must lie in [0, {self.pos_dim}]")
        for arr in (self.rows, self.lengths, self.full_lengths):
            arr.setflags(write=False)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, tokens: Sequence[bytes | None], pos_dim: int = 16,
                   source: str = "bytes") -> ByteVocab:
        """One entry per id; None marks an unassigned id (an empty row, reported as missing)."""
        if pos_dim < 1:
            raise ValueError(f"pos_dim must be >= 1; got {pos_dim}")
        present = [b"" if t is None else t for t in tokens]
        rows, lengths = encode_bytes(present, pos_dim)
        full = np.array([-1 if t is None else len(t) for t in tokens], np.int32)
        return cls(rows, lengths, full, source)

    @classmethod
    def from_tiktoken(cls, encoding: Any, pos_dim: int = 16) -> ByteVocab:
        """Raw bytes via decode_single_token_bytes; special tokens as their literal text."""
        tokens: list[bytes | None] = []
        for i in range(encoding.n_vocab):
            try:
                tokens.append(encoding.decode_single_token_bytes(i))
            except KeyError:
                tokens.append(None)  # a hole in the id space (cl100k_base has some)
        return cls.from_bytes(tokens, pos_dim, source=f"tiktoken:{encoding.name}")

    @classmethod
    def from_sentencepiece(cls, processor: Any, pos_dim: int = 16) -> ByteVocab:
        """U+2581 -> space; <0xNN> -> that byte; control/user/unknown -> literal piece text."""
        tokens: list[bytes | None] = []
        for i in range(processor.get_piece_size()):
            piece = processor.id_to_piece(i)
            match = _SP_BYTE.match(piece)
            if processor.is_byte(i) and match:
                tokens.append(bytes([int(match.group(1), 16)]))
            elif (processor.is_control(i) or processor.is_unknown(i)
                  or _is_user_defined(processor, i)):
                tokens.append(piece.encode("utf-8"))
            else:
                tokens.append(piece.replace(_SP_SPACE, " ").encode("utf-8"))
        return cls.from_bytes(tokens, pos_dim, source="sentencepiece")

    def pad_to(self, n: int) -> ByteVocab:
        """Extend to n ids with empty rows (e.g. nanoGPT's 50304); padded ids embed to 0."""
        v = self.vocab_size
        if n < v:
            raise ValueError(f"cannot pad a vocabulary of {v} ids down to {n}")
        extra = n - v
        return ByteVocab(
            np.concatenate([self.rows, np.zeros((extra, self.pos_dim), np.uint8)]),
            np.concatenate([self.lengths, np.zeros((extra,), np.int16)]),
            np.concatenate([self.full_lengths, -np.ones((extra,), np.int32)]),
            self.source)

    # -- properties ---------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.rows.shape[0])

    @property
    def pos_dim(self) -> int:
        return int(self.rows.shape[1])

    @property
    def codec_dim(self) -> int:
        return CHAR_DIM * self.pos_dim

    def token_bytes(self, i: int) -> bytes:
        """The (truncated) bytes the codec sees for id i."""
        return self.rows[i, :self.lengths[i]].tobytes()

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 over rows, lengths and the codec settings: what a checkpoint must match."""
        h = hashlib.sha256()
        h.update(json.dumps({"char_dim": CHAR_DIM, "pos_dim": self.pos_dim, "eps": EPS,
                             "norm": "zscore-ddof1-eps-on-std", "v": FORMAT_VERSION}).encode())
        h.update(np.ascontiguousarray(self.rows).tobytes())
        h.update(self.lengths.astype("<i2").tobytes())
        return h.hexdigest()

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteVocab) and self.fingerprint == other.fingerprint

    def __repr__(self) -> str:
        return (f"ByteVocab(V={self.vocab_size}, pos_dim={self.pos_dim}, source={self.source!r}, "
                f"fingerprint={self.fingerprint[:12]})")

    # -- reports ------------------------------------------------------------------------
    def coverage(self) -> dict[str, Any]:
        """How many tokens fit pos_dim whole, how many were cut, how many ids are empty."""
        real = self.full_lengths >= 0
        n_real = int(real.sum())
        truncated = int((self.full_lengths > self.pos_dim).sum())
        return {
            "vocab_size": self.vocab_size, "pos_dim": self.pos_dim, "assigned": n_real,
            "unassigned_or_padding": self.vocab_size - n_real,
            "empty": int(((self.lengths == 0) & real).sum()),
            "truncated": truncated,
            "pct_within_pos_dim": 100.0 * (n_real - truncated) / max(n_real, 1),
            "max_token_bytes": int(self.full_lengths.max()) if self.vocab_size else 0,
        }

    def collisions(self) -> dict[str, Any]:
        """Distinct assigned ids whose codec rows are equal (they embed identically)."""
        groups: dict[bytes, list[int]] = defaultdict(list)
        for i in np.flatnonzero(self.full_lengths >= 0):
            groups[self.token_bytes(int(i))].append(int(i))
        shared = [ids for ids in groups.values() if len(ids) > 1]
        truncated_involved = sum(
            1 for ids in shared for i in ids if self.full_lengths[i] > self.pos_dim)
        return {
            "tokens_sharing_a_row": sum(len(g) for g in shared),
            "groups": len(shared),
            "tokens_truncated_in_groups": truncated_involved,
            "examples": [ids[:4] for ids in sorted(shared, key=len, reverse=True)[:5]],
        }

    # -- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write an .npz; refuses to overwrite a different vocabulary at the same path."""
        path = Path(path)
        if path.exists():
            if ByteVocab.load(path) == self:
                return
            raise FileExistsError(f"{path} already holds a different vocabulary; not overwriting")
        with atomic_path(path, suffix=".npz") as tmp:  # np.savez adds .npz to other names
            np.savez(tmp, rows=self.rows, lengths=self.lengths, full_lengths=self.full_lengths,
                     source=np.array(self.source), fingerprint=np.array(self.fingerprint),
                     format_version=np.array(FORMAT_VERSION))

    @classmethod
    def load(cls, path: str | Path) -> ByteVocab:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                vocab = cls(z["rows"], z["lengths"], z["full_lengths"], str(z["source"]))
                stored = str(z["fingerprint"])
        except (zipfile.BadZipFile, EOFError, KeyError, ValueError, OSError) as e:
            raise ValueError(f"{path} is not a readable ByteVocab .npz (truncated or foreign "
                             f"file?): {e}") from e
        if stored != vocab.fingerprint:
            raise ValueError(f"{path}: stored fingerprint {stored[:12]} does not match its "
                             f"contents {vocab.fingerprint[:12]}; the file is corrupt")
        return vocab


def _is_user_defined(processor: Any, i: int) -> bool:
    fn = getattr(processor, "is_user_defined", None)
    return bool(fn(i)) if fn is not None else False


# Byte-length histogram (1, 2, ..., 15, 16+ bytes) of the first 50257 cl100k_base tokens: a
# realistic BPE vocabulary's, for the synthetic stand-in when no tokenizer is at hand.
BPE_LENGTH_HIST = (0.0051, 0.0569, 0.1464, 0.1602, 0.1527, 0.1262, 0.1085, 0.0830, 0.0594,
                   0.0388, 0.0256, 0.0153, 0.0080, 0.0049, 0.0024, 0.0067)


def synthetic_vocab(n: int, pos_dim: int, seed: int = 0) -> ByteVocab:
    """A stand-in of n ids: random printable-ASCII bytes whose lengths follow BPE_LENGTH_HIST.

    For compiling and timing only, never for training: the closed form's cost depends on the
    lengths (one gather per byte), not on which bytes. The 16+ bin is 16 bytes.
    """
    rng = np.random.default_rng(seed)
    p = np.asarray(BPE_LENGTH_HIST, np.float64)
    lengths = rng.choice(np.arange(1, len(p) + 1), size=n, p=p / p.sum())
    tokens = [bytes(rng.integers(32, 127, size=int(k)).astype(np.uint8)) for k in lengths]
    return ByteVocab.from_bytes(tokens, pos_dim, source=f"synthetic-bpe-lengths[{n}]")


def tiktoken_prefix_vocab(encoding: Any, n: int, pos_dim: int) -> ByteVocab:
    """The first n ids of a tiktoken encoding (padded with empty ids past its end): a stand-in
    of n real BPE tokens for benchmarks and dry runs when the configured tokenizer is not here."""
    if n >= encoding.n_vocab:
        return ByteVocab.from_tiktoken(encoding, pos_dim).pad_to(n)
    tokens: list[bytes | None] = []
    for i in range(n):
        try:
            tokens.append(encoding.decode_single_token_bytes(i))
        except KeyError:
            tokens.append(None)
    return ByteVocab.from_bytes(tokens, pos_dim, source=f"tiktoken:{encoding.name}[:{n}]")

