"""Tokenizer adapters: exact round trips, byte-fallback pieces, fingerprints, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from kronjax.data.tokenizers import load_tokenizer, train_sentencepiece

TRICKY = "Hello  world\n\n\tx = 12345 ☃ 𝔘 é  trailing  \n<|endoftext|> end"


def test_sentencepiece_round_trip_is_exact(sp_tokenizer) -> None:
    ids = sp_tokenizer.encode(TRICKY)
    assert sp_tokenizer.decode(ids) == TRICKY
    assert sp_tokenizer.encode_batch([TRICKY, "a"]) == [ids, sp_tokenizer.encode("a")]
    assert sp_tokenizer.processor.unk_id() not in ids  # byte fallback: nothing is unknown
    assert sp_tokenizer.vocab_size == 1024 and 0 <= min(ids) and max(ids) < 1024
    # sentencepiece's one known loss: a literal U+2581 in the text is its space marker.
    assert sp_tokenizer.decode(sp_tokenizer.encode("a\u2581b")) == "a b"


def test_sentencepiece_has_all_byte_pieces_and_eos(sp_tokenizer) -> None:
    p = sp_tokenizer.processor
    pieces = {p.id_to_piece(i) for i in range(p.get_piece_size()) if p.is_byte(i)}
    assert pieces == {f"<0x{b:02X}>" for b in range(256)}
    assert sp_tokenizer.eot_id == p.eos_id() >= 0
    assert sp_tokenizer.spec.startswith("sentencepiece:")


def test_fingerprint_is_stable_and_tells_tokenizers_apart(sp_model_path: Path, sp_tokenizer,
                                                          cl100k, tmp_path: Path) -> None:
    assert load_tokenizer(f"sentencepiece:{sp_model_path}").fingerprint == sp_tokenizer.fingerprint
    from pydoc_data.topics import topics

    other = train_sentencepiece([topics[k] for k in sorted(topics)][:40], 512, tmp_path / "o")
    fingerprints = {sp_tokenizer.fingerprint, cl100k.fingerprint,
                    load_tokenizer(f"sentencepiece:{other}").fingerprint}
    assert len(fingerprints) == 3 and all(len(f) == 64 for f in fingerprints)


def test_training_is_deterministic_and_never_overwrites(tmp_path: Path) -> None:
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)][:30]
    a = train_sentencepiece(texts, 400, tmp_path / "a")
    b = train_sentencepiece(texts, 400, tmp_path / "b")
    assert a.read_bytes() != b"" and a.name == "a.model"
    fa, fb = (load_tokenizer(f"sentencepiece:{p}").fingerprint for p in (a, b))
    assert fa == fb
    with pytest.raises(FileExistsError, match="overwrite=True"):
        train_sentencepiece(texts, 400, tmp_path / "a")
    assert train_sentencepiece(texts, 400, tmp_path / "a", overwrite=True) == a


def test_training_with_impossible_vocab_says_why(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_sentencepiece(["tiny text"], 50, tmp_path / "x")


def test_tiktoken_offline_round_trip(cl100k) -> None:
    ids = cl100k.encode(TRICKY)
    assert cl100k.decode(ids) == TRICKY
    assert cl100k.eot_id == 100257 and cl100k.eot_id not in ids  # ordinary text: no specials
    assert cl100k.vocab_size == 100277 and cl100k.spec == "tiktoken:cl100k_base_offline"
    assert cl100k.encode_batch([TRICKY, "b"]) == [ids, cl100k.encode("b")]
    assert cl100k.encoding.name == "cl100k_base_offline"


def test_bad_specs_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tiktoken:.*sentencepiece:"):
        load_tokenizer("foo:bar")
    with pytest.raises(ValueError, match="unknown tokenizer spec"):
        load_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="available: .*cl100k_base_offline"):
        load_tokenizer("tiktoken:no_such_encoding")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(f"sentencepiece:{tmp_path / 'missing.model'}")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a model")
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        load_tokenizer(f"sentencepiece:{bad}")


def test_tiktoken_download_failure_names_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import tiktoken

    def offline(name: str):
        raise ConnectionError("Failed to resolve openaipublic.blob.core.windows.net")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match="needs network.*cl100k_base_offline"):
        load_tokenizer("tiktoken:gpt2")


def test_byte_vocab_covers_every_id(sp_tokenizer) -> None:
    vocab = sp_tokenizer.byte_vocab(16)
    assert vocab.rows.shape == (sp_tokenizer.vocab_size, 16)
