"""Property tests (hypothesis): any bytes embed finitely and identically in every mode,
independently of the batch around them; truncation and fingerprints behave.

Arbitrary strings go through `embed_bytes` (jitted once per mode and batch size: the bytes
are arguments); batches of ids go through `__call__` on one fixed vocabulary (jitted once per
mode). Only the dense-mode test builds a vocabulary (and its V x D table) per example.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kronjax import ByteVocab, KroneckerEmbed, encode_bytes, reference_codec, truncate

P = 16
F = 8
BATCH = 8
MODES = ("sparse", "dense", "bytes")
W = np.random.default_rng(7).normal(0, 1 / np.sqrt(256 * P), (256 * P, F)).astype(np.float32)
PARAMS = {"params": {"projection": W}}

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# Byte strings of every kind: raw binary (NULs, invalid UTF-8), real text, long text.
any_bytes = st.one_of(
    st.binary(max_size=3 * P),
    st.text(max_size=3 * P).map(lambda s: s.encode("utf-8")),
    st.integers(0, 2 * P).map(lambda n: b"\x00" * n),
    st.text(min_size=P, max_size=2 * P).map(lambda s: s.encode("utf-8")),
)
batches = st.lists(any_bytes, min_size=1, max_size=BATCH)

# A fixed vocabulary for the id-batch tests: edge cases, then seeded random strings.
_rng = np.random.default_rng(11)
FIXED = ByteVocab.from_bytes(
    [b"", b"\x00", b"\x00" * 40, b"\xff\xfe", b"\xe2\x82", "€".encode() * 9, b"the", b" the"]
    + [_rng.integers(0, 256, _rng.integers(0, 3 * P), dtype=np.uint8).tobytes()
       for _ in range(24)], P)


def _close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-4) -> None:
    b = np.asarray(b, np.float64)
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol,
                               atol=rtol * max(np.abs(b).max(), 1e-6))


def _oracle(vocab: ByteVocab) -> np.ndarray:
    return reference_codec(vocab.rows, vocab.lengths).astype(np.float64) @ W.astype(np.float64)


@functools.cache
def _bytes_fn(mode: str):
    module = KroneckerEmbed(ByteVocab.from_bytes([b""], P), F, mode=mode)
    return jax.jit(lambda r, n: module.apply(PARAMS, r, n, method=KroneckerEmbed.embed_bytes))


def _embed_bytes(tokens: list[bytes], mode: str) -> np.ndarray:
    return np.asarray(_bytes_fn(mode)(*encode_bytes(tokens, P)))


@functools.cache
def _ids_fn(mode: str):
    module = KroneckerEmbed(FIXED, F, mode=mode)
    return jax.jit(lambda ids: module.apply(PARAMS, ids))


def test_dense_mode_traces_under_jit() -> None:
    vocab = ByteVocab.from_bytes([b"only", b"under", b"jit", bytes([P])], P)  # a fresh table
    fn = jax.jit(lambda ids: KroneckerEmbed(vocab, F, mode="dense").apply(PARAMS, ids))
    _close(np.asarray(fn(np.arange(4))), _oracle(vocab))


def _embed_all(vocab: ByteVocab, mode: str) -> np.ndarray:
    """Every id of a BATCH-sized vocabulary through __call__, as one (2, BATCH/2) batch."""
    ids = np.arange(BATCH).reshape(2, -1)
    out = KroneckerEmbed(vocab, F, mode=mode).apply(PARAMS, ids)
    return np.asarray(out).reshape(BATCH, F)


def _pad(tokens: list[bytes]) -> list[bytes]:
    return tokens + [b""] * (BATCH - len(tokens))


@SETTINGS
@given(batches)
@example([b""])
@example([b"\x00" * (3 * P), b"\xff" * P, b"\xe2\x82", "€".encode() * P])
def test_any_bytes_finite_and_modes_agree(tokens: list[bytes]) -> None:
    tokens = _pad(tokens)
    oracle = _oracle(ByteVocab.from_bytes(tokens, P))
    empty = np.array([len(t) == 0 for t in tokens])
    outs = {mode: _embed_bytes(tokens, mode) for mode in ("sparse", "bytes")}
    for mode, out in outs.items():
        assert out.dtype == np.float32 and np.isfinite(out).all(), mode
        _close(out, oracle)
        assert np.all(out[empty] == 0), mode
    _close(outs["bytes"], outs["sparse"])


# Not bitwise: XLA picks other kernels for 1 row than for 8. The closed form differs by
# ~1e-7 relative; the dense z @ W (a D-long float32 dot per entry) by up to ~5e-6.
# A real batch leak (statistics over the batch, a shifted gather) is off by O(1).
BATCH_RTOL = {"sparse": 1e-6, "bytes": 2e-5, "dense": 2e-5}


@SETTINGS
@given(any_bytes, st.lists(any_bytes, max_size=BATCH - 1), st.data())
def test_bytes_row_independent_of_batch(token: bytes, others: list[bytes],
                                        data: st.DataObject) -> None:
    """Embedding a string alone equals embedding it at any slot of any batch."""
    k = data.draw(st.integers(0, len(others)), label="slot")
    batch = _pad(others[:k] + [token] + others[k:])
    for mode in ("sparse", "bytes"):
        _close(_embed_bytes(batch, mode)[k], _embed_bytes([token], mode)[0],
               rtol=BATCH_RTOL[mode])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, FIXED.vocab_size - 1), min_size=BATCH, max_size=BATCH),
       st.integers(0, BATCH - 1))
def test_id_row_independent_of_batch(ids: list[int], k: int) -> None:
    """An id embeds the same alone ((1, 1) batch) as at any slot of any (2, 4) batch."""
    ids_2x4 = np.array(ids).reshape(2, 4)
    for mode in MODES:
        batch = np.asarray(_ids_fn(mode)(ids_2x4)).reshape(BATCH, F)
        alone = np.asarray(_ids_fn(mode)(np.array([[ids[k]]])))[0, 0]
        assert np.isfinite(batch).all()
        _close(batch[k], alone, rtol=BATCH_RTOL[mode])
        _close(batch, _oracle(FIXED)[ids])


# mode="dense" builds a V x D table per vocabulary (a compile each time): fewer examples.
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches)
@example([b"\x00\xff" * P, b"", "€".encode() * P, b"\xc3"])
def test_vocab_from_any_bytes_all_modes(tokens: list[bytes]) -> None:
    vocab = ByteVocab.from_bytes(tokens, P).pad_to(BATCH)
    oracle = _oracle(vocab)
    for mode in MODES:
        out = _embed_all(vocab, mode)
        assert out.dtype == np.float32 and np.isfinite(out).all(), mode
        _close(out, oracle)
        assert np.all(out[vocab.lengths == 0] == 0), mode


def _valid(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=80), st.text(max_size=40).map(lambda s: s.encode())),
       st.integers(1, 40))
@example("€".encode() * 3, 4)
@example(b"\xff" * 5, 3)
def test_truncate_never_splits_a_character(token: bytes, pos_dim: int) -> None:
    cut = truncate(token, pos_dim)
    assert len(cut) <= pos_dim and token.startswith(cut)
    if len(token) <= pos_dim:
        assert cut == token
    elif _valid(token):
        assert _valid(cut)                     # whole characters only ...
        assert len(cut) > pos_dim - 4          # ... and no more than one character dropped
        assert not _valid(token[:len(cut) + 1]) or len(cut) == pos_dim
    else:
        assert cut == token[:pos_dim]          # invalid UTF-8 is cut plainly


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=2 * P), min_size=1, max_size=6), st.data())
@example([b"a"], None)
def test_fingerprint_changes_when_any_row_changes(tokens: list[bytes],
                                                  data: st.DataObject | None) -> None:
    if data is None:   # the explicit example: same row bytes, one more (NUL) byte
        i, new = 0, b"a\x00"
    else:
        i = data.draw(st.integers(0, len(tokens) - 1), label="index")
        new = data.draw(st.binary(max_size=2 * P), label="new bytes")
    before = ByteVocab.from_bytes(tokens, P)
    after = ByteVocab.from_bytes(tokens[:i] + [new] + tokens[i + 1:], P)
    assert before.fingerprint == ByteVocab.from_bytes(list(tokens), P).fingerprint  # stable
    same_row = truncate(tokens[i], P) == truncate(new, P)
    assert (before.fingerprint == after.fingerprint) == same_row
    assert before.pad_to(len(tokens) + 1).fingerprint != before.fingerprint
    assert ByteVocab.from_bytes(tokens, P + 1).fingerprint != before.fingerprint


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
