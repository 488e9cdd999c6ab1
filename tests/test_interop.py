"""kronjax.interop: safetensors export/import, and exchange with the PyTorch reference."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from torch_ref import needs_torch

from kronjax import ByteVocab, KroneckerEmbed
from kronjax.interop import InteropError, export_safetensors, import_safetensors

P = 8
F = 6
WORDS = [b"", b"the", b" the", b"\x00", b"\x00\x00a", b"\xff\xfe", b"\xe2\x82",
         "naïve".encode(), "日本語です".encode(), b"abcdefghijklmnop", "€".encode() * 5]




@pytest.fixture(scope="module")
def vocab() -> ByteVocab:
    return ByteVocab.from_bytes(WORDS + [None], pos_dim=P, source="test-words").pad_to(16)


def _w(seed: int = 0, d: int = 256 * P, f: int = F) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1 / np.sqrt(d), (d, f)).astype(np.float32)


def _ours(vocab: ByteVocab, w: np.ndarray, ids: np.ndarray, mode: str = "sparse") -> np.ndarray:
    module = KroneckerEmbed(vocab, w.shape[1], mode=mode)
    return np.asarray(module.apply({"params": {"projection": w}}, ids))


IDS = np.array([[1, 2, 3, 4, 5], [15, 0, 10, 9, 11]])


# -- round trips ------------------------------------------------------------------------

def test_roundtrip_projection_only(tmp_path: Path) -> None:
    w = _w()
    path = export_safetensors(tmp_path / "w.safetensors", w)
    raw = load_file(str(path))
    assert list(raw) == ["projection.weight"]
    assert raw["projection.weight"].shape == (F, 256 * P)            # torch Linear layout
    assert raw["projection.weight"].dtype == np.float32
    w2, vocab2, meta = import_safetensors(path)
    assert vocab2 is None and w2.dtype == np.float32 and w2.flags.c_contiguous
    np.testing.assert_array_equal(w2, w)
    assert meta["format"] == "kronjax-v1"
    assert (meta["pos_dim"], meta["d_model"], meta["codec_dim"]) == (str(P), str(F), str(256 * P))


def test_roundtrip_with_vocab_and_metadata(tmp_path: Path, vocab: ByteVocab) -> None:
    w = _w(1)
    path = export_safetensors(tmp_path / "wv.safetensors", w, vocab,
                              metadata={"run": "abc", "step": 1200, "tags": ["x", "y"]})
    raw = load_file(str(path))
    assert raw["byte_buffer"].dtype == np.uint8 and raw["byte_buffer"].shape == (16, P)
    assert raw["length_buffer"].dtype == np.int16 and raw["length_buffer"].shape == (16,)
    w2, vocab2, meta = import_safetensors(path)
    np.testing.assert_array_equal(w2, w)
    assert vocab2 == vocab and vocab2.fingerprint == meta["vocab_fingerprint"]
    np.testing.assert_array_equal(vocab2.full_lengths, vocab.full_lengths)  # padding kept
    assert vocab2.source == "test-words" and vocab2.coverage() == vocab.coverage()
    assert (meta["run"], meta["step"], meta["tags"]) == ("abc", "1200", '["x", "y"]')
    np.testing.assert_array_equal(_ours(vocab2, w2, IDS), _ours(vocab, w, IDS))


def test_accepts_jax_and_bfloat16_arrays(tmp_path: Path) -> None:
    w = _w(2)
    path = export_safetensors(tmp_path / "bf.safetensors", jnp.asarray(w, jnp.bfloat16))
    w2, _, _ = import_safetensors(path)
    np.testing.assert_array_equal(w2, np.asarray(jnp.asarray(w, jnp.bfloat16), np.float32))


def test_refuses_to_overwrite(tmp_path: Path, vocab: ByteVocab) -> None:
    path = tmp_path / "w.safetensors"
    export_safetensors(path, _w(3))
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_safetensors(path, _w(4))
    assert path.read_bytes() == before
    export_safetensors(path, _w(4), vocab, overwrite=True)
    np.testing.assert_array_equal(import_safetensors(path)[0], _w(4))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp files left


# -- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("w, match", [
    (np.zeros((256 * P,), np.float32), "2-D"),
    (np.zeros((300, F), np.float32), "multiple of 256"),
    (np.zeros((F, 256 * P), np.float32), "transposed"),
    (np.zeros((256 * P, F), np.int32), "floating"),
])
def test_export_rejects_bad_projection(tmp_path: Path, w: np.ndarray, match: str) -> None:
    with pytest.raises(InteropError, match=match):
        export_safetensors(tmp_path / "x.safetensors", w)
    assert not list(tmp_path.iterdir())


def test_export_rejects_mismatched_vocab_and_reserved_metadata(tmp_path: Path,
                                                               vocab: ByteVocab) -> None:
    with pytest.raises(InteropError, match=r"pos_dim=4\).*pos_dim=8"):
        export_safetensors(tmp_path / "x.safetensors", _w(d=1024), vocab)
    with pytest.raises(InteropError, match="reserved"):
        export_safetensors(tmp_path / "x.safetensors", _w(), metadata={"pos_dim": "9"})
    assert not list(tmp_path.iterdir())


def _write(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, str] | None = None
           ) -> Path:
    save_file(tensors, str(path), metadata=meta)
    return path


def test_import_errors(tmp_path: Path, vocab: ByteVocab) -> None:
    w_FxD = _w().T.copy()
    with pytest.raises(FileNotFoundError):
        import_safetensors(tmp_path / "missing.safetensors")
    cases = {
        "no projection": ({"embed.weight": w_FxD}, None, r"no 'projection.weight'.*embed\.weight"),
        "D not 256k": ({"projection.weight": np.zeros((F, 300), np.float32)}, None,
                       "multiple of 256"),
        "our layout": ({"projection.weight": _w()}, None, "transposed"),
        "3-D": ({"projection.weight": np.zeros((1, F, 256), np.float32)}, None, "2-D"),
        "pos_dim meta": ({"projection.weight": w_FxD}, {"pos_dim": "16"},
                         r"pos_dim=16 but .* 256 \* 8"),
        "d_model meta": ({"projection.weight": w_FxD}, {"d_model": "7"}, "d_model=6"),
        "foreign format": ({"projection.weight": w_FxD}, {"format": "other-v9"}, "format"),
        "rows wrong P": ({"projection.weight": w_FxD,
                          "byte_buffer": np.zeros((3, P + 1), np.uint8),
                          "length_buffer": np.zeros((3,), np.int16)}, None, "pos_dim=8"),
        "rows alone": ({"projection.weight": w_FxD, "byte_buffer": np.zeros((3, P), np.uint8)},
                       None, "'length_buffer' is missing"),
        "length too big": ({"projection.weight": w_FxD,
                            "byte_buffer": np.zeros((3, P), np.uint8),
                            "length_buffer": np.full((3,), P + 1, np.int16)}, None,
                           r"\[0, 8\]"),
    }
    for name, (tensors, meta, match) in cases.items():
        path = _write(tmp_path / f"{name}.safetensors", tensors, meta)
        with pytest.raises(InteropError, match=match):
            import_safetensors(path)


def test_import_detects_damage(tmp_path: Path, vocab: ByteVocab) -> None:
    good = export_safetensors(tmp_path / "good.safetensors", _w(), vocab)
    data = good.read_bytes()
    for name, blob in {"truncated": data[:len(data) // 2], "header only": data[:40],
                       "empty": b"", "garbage": b"not a safetensors file at all" * 4}.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(InteropError, match="not a readable safetensors"):
            import_safetensors(bad)
    # A vocabulary edited after export no longer matches its recorded fingerprint.
    tensors = load_file(str(good))
    tensors["byte_buffer"] = tensors["byte_buffer"].copy()
    tensors["byte_buffer"][1, 0] ^= 1
    from safetensors import safe_open
    with safe_open(str(good), framework="numpy") as f:
        meta = f.metadata()
    with pytest.raises(InteropError, match="fingerprint"):
        import_safetensors(_write(tmp_path / "edited.safetensors", tensors, meta))


# -- the PyTorch reference ---------------------------------------------------------------

def _torch_module(vocab: ByteVocab, mode: str, buffers: dict | None = None):
    import torch
    from kronecker_embeddings import KroneckerEmbedding

    rows = buffers["byte_buffer"] if buffers else torch.from_numpy(vocab.rows.copy())
    lengths = buffers["length_buffer"] if buffers else torch.from_numpy(vocab.lengths.copy())
    return KroneckerEmbedding(vocab.vocab_size, F, pos_dim=vocab.pos_dim, mode=mode,
                              byte_buffer=rows, length_buffer=lengths)


def _close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


@needs_torch
@pytest.mark.parametrize("torch_mode", ["dynamic", "cached"])
def test_reference_loads_our_export(tmp_path: Path, vocab: ByteVocab, torch_mode: str) -> None:
    import torch
    from safetensors.torch import load_file as torch_load_file

    w = _w(5)
    path = export_safetensors(tmp_path / "ours.safetensors", w, vocab)
    tensors = torch_load_file(str(path))
    module = _torch_module(vocab, torch_mode, tensors)  # buffers straight from the file
    module.load_state_dict({"projection.weight": tensors["projection.weight"]})
    with torch.no_grad():
        theirs = module(torch.from_numpy(IDS)).numpy()
    for mode in ("sparse", "dense", "bytes"):
        _close(_ours(vocab, w, IDS, mode), theirs)


@needs_torch
def test_we_load_a_reference_state_dict(tmp_path: Path, vocab: ByteVocab) -> None:
    import torch
    from safetensors.torch import save_file as torch_save_file

    torch.manual_seed(0)
    module = _torch_module(vocab, "dynamic")
    path = tmp_path / "theirs.safetensors"
    torch_save_file(module.state_dict(), str(path))
    w, vocab2, meta = import_safetensors(path)
    assert vocab2 is None and meta == {} and w.shape == (256 * P, F)
    with torch.no_grad():
        theirs = module(torch.from_numpy(IDS)).numpy()
    for mode in ("sparse", "dense", "bytes"):
        _close(_ours(vocab, w, IDS, mode), theirs)

    # A bf16 copy of the module imports as its float32 upcast.
    torch_save_file({k: v.bfloat16() for k, v in module.state_dict().items()},
                    str(tmp_path / "bf16.safetensors"))
    w16, _, _ = import_safetensors(tmp_path / "bf16.safetensors")
    expected = module.projection.weight.detach().bfloat16().float().numpy().T
    np.testing.assert_array_equal(w16, expected)
