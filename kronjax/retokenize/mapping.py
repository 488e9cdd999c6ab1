"""Which source tokens stand for each token of a new tokenizer: the input to every row init.

A token is keyed by what it means in text: ("text", its exact bytes) for ordinary tokens
(sentencepiece's U+2581 as a space), ("byte", b) for a sentencepiece byte-fallback piece,
("special", literal text) for control and special tokens. A new token whose key the source
has keeps that source token's rows (the same id first, so a tokenizer swapped for itself maps
every id to itself); the new end-of-text token takes the source's. Every other new token is
its bytes as the source tokenizer segments them (FVT, zero-shot tokenizer transfer's
standard init): valid UTF-8 runs encoded as text, stray bytes (partial characters of a
byte-level BPE) as the source's single-byte tokens.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from kronjax.data.tokenizers import SentencePieceTokenizer, TiktokenTokenizer, Tokenizer

Key = tuple[str, bytes]
_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SURROGATES = re.compile("([\udc80-\udcff]+)")


def token_keys(tok: Tokenizer) -> list[Key]:
    """One key per id (module docstring); ("none", b"") for an unassigned id."""
    if isinstance(tok, SentencePieceTokenizer):
        p, keys = tok.processor, []
        for i in range(tok.vocab_size):
            piece = p.id_to_piece(i)
            if p.is_byte(i) and (m := _SP_BYTE.match(piece)):
                keys.append(("byte", bytes([int(m.group(1), 16)])))
            elif p.is_control(i) or p.is_unknown(i):
                keys.append(("special", piece.encode("utf-8")))
            else:
                keys.append(("text", piece.replace("\u2581", " ").encode("utf-8")))
        return keys
    if isinstance(tok, TiktokenTokenizer):
        enc = tok.encoding
        special = {enc.encode_single_token(s) for s in enc.special_tokens_set}
        keys = []
        for i in range(tok.vocab_size):
            try:
                b = enc.decode_single_token_bytes(i)
            except KeyError:
                keys.append(("none", b""))
                continue
            keys.append(("special" if i in special else "text", b))
        return keys
    vocab = tok.byte_vocab(1024)  # any other adapter: its exact bytes
    return [("text", vocab.token_bytes(i)) for i in range(tok.vocab_size)]


def byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of text each id stands for (0 for specials): for bits per byte."""
    return np.array([len(b) if kind in ("text", "byte") else 0 for kind, b in token_keys(tok)],
                    np.int64)


@dataclasses.dataclass
class TokenMap:
    """For each new id: `exact` the source id with its key (-1: none) and `pieces` the source
    ids its bytes segment into (empty where exact, or where nothing segments)."""

    exact: np.ndarray            # (V_new,) int64
    pieces: list[list[int]]

    @property
    def n_new(self) -> int:
        """Ids with no source token of their own: what --init decides."""
        return int((self.exact < 0).sum())


def _source_pieces(data: bytes, source: Tokenizer, byte_ids: dict[bytes, int]) -> list[Any]:
    """Segments of data: str runs to encode with the source, ints for stray bytes."""
    out: list[Any] = []
    for part in _SURROGATES.split(data.decode("utf-8", errors="surrogateescape")):
        if not part:
            continue
        if _SURROGATES.fullmatch(part):
            for raw in part.encode("utf-8", errors="surrogateescape"):
                if (j := byte_ids.get(bytes([raw]))) is not None:
                    out.append(j)
        else:
            out.append(part)
    return out


def map_tokens(source: Tokenizer, target: Tokenizer) -> TokenMap:
    """The TokenMap of target's ids onto source's (module docstring)."""
    src_keys, new_keys = token_keys(source), token_keys(target)
    index: dict[Key, int] = {}
    for i, key in enumerate(src_keys):
        if key[0] != "none":
            index.setdefault(key, i)
    byte_ids = {b: i for i, (kind, b) in enumerate(src_keys)
                if kind == "byte" or (kind == "text" and len(b) == 1)}
    exact = np.full((len(new_keys),), -1, np.int64)
    segments: dict[int, list[Any]] = {}
    for j, key in enumerate(new_keys):
        if j < len(src_keys) and src_keys[j] == key and key[0] != "none":
            exact[j] = j
        elif key in index:
            exact[j] = index[key]
        elif j == target.eot_id and source.eot_id is not None:
            exact[j] = source.eot_id
        elif key[0] != "none":
            segments[j] = _source_pieces(key[1], source, byte_ids)
    texts = sorted({s for segs in segments.values() for s in segs if isinstance(s, str)})
    encoded = dict(zip(texts, source.encode_batch(texts) if texts else [], strict=True))
    pieces: list[list[int]] = [[] for _ in new_keys]
    for j, segs in segments.items():
        pieces[j] = [int(i) for s in segs for i in (encoded[s] if isinstance(s, str) else [s])]
    return TokenMap(exact, pieces)
