"""Exchange the projection W (and optionally the byte vocabulary) with PyTorch via safetensors.

The authors' PyTorch package keeps W as `projection.weight` of an `nn.Linear(C, d_model)`,
i.e. (D, C); kronjax keeps it as (C, D). Files written here hold the torch layout, so

    tensors = safetensors.torch.load_file(path)
    module.load_state_dict({"projection.weight": tensors["projection.weight"]})

works on a `kronecker_embeddings.KroneckerEmbedding`, and a file saved from such a module's
`state_dict()` imports here. Only `safetensors.numpy` is used: no torch needed.

Tensors: projection.weight (D, C) float32; with a vocabulary also byte_buffer (V, P) uint8,
length_buffer (V,) int16 (the names of the package's buffers) and full_length_buffer (V,)
int32 (lengths before truncation, -1 for padding: kronjax's coverage reports).
Metadata (strings): format "kronjax-v1", pos_dim, d_model, codec_dim, char_dim, eps, norm,
and with a vocabulary vocab_size, vocab_fingerprint, vocab_source; plus the caller's own keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kronjax.codec import CHAR_DIM, EPS
from kronjax.files import atomic_path
from kronjax.vocab import ByteVocab

FORMAT = "kronjax-v1"
WEIGHT = "projection.weight"
BYTES = "byte_buffer"
LENGTHS = "length_buffer"
FULL_LENGTHS = "full_length_buffer"
NORM = "zscore-ddof1-eps-on-std"
_RESERVED = ("format", "pos_dim", "d_model", "codec_dim", "char_dim", "eps", "norm",
             "vocab_size", "vocab_fingerprint", "vocab_source")


class InteropError(ValueError):
    """A safetensors file (or an array to export) that kronjax cannot use as it is."""


def export_safetensors(path: str | os.PathLike, projection_CxD: Any,
                       vocab: ByteVocab | None = None,
                       metadata: Mapping[str, Any] | None = None,
                       overwrite: bool = False) -> Path:
    """Write W (C, D) as `projection.weight` (D, C) float32, plus the vocabulary if given.

    Refuses to replace an existing file unless overwrite=True; the file appears atomically
    (written beside it, then renamed), so an interrupted export leaves no partial file.
    Extra metadata values that are not strings are stored as JSON.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    tensors, meta = projection_tensors(projection_CxD, vocab, metadata)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        if not overwrite and path.exists():  # appeared while we were writing
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    return path


def projection_tensors(projection_CxD: Any, vocab: ByteVocab | None = None,
                       metadata: Mapping[str, Any] | None = None
                       ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and string metadata `export_safetensors` writes, in the torch layout:
    also what kronjax.export puts in a nanoGPT checkpoint for the authors' module."""
    w_CxD = np.asarray(projection_CxD)
    if w_CxD.ndim != 2:
        raise InteropError(f"projection must be 2-D (C, d_model); got shape {w_CxD.shape}")
    if not _is_float(w_CxD.dtype):
        raise InteropError(f"projection must be floating point; got {w_CxD.dtype}")
    d, f = w_CxD.shape
    pos_dim = _pos_dim_of(d, "projection rows (C)")
    tensors = {WEIGHT: np.ascontiguousarray(w_CxD.astype(np.float32).T)}
    meta = {"format": FORMAT, "pos_dim": str(pos_dim), "d_model": str(f), "codec_dim": str(d),
            "char_dim": str(CHAR_DIM), "eps": repr(EPS), "norm": NORM}
    if vocab is not None:
        if vocab.codec_dim != d:
            raise InteropError(f"projection has C={d} rows (pos_dim={pos_dim}) but the "
                               f"vocabulary has pos_dim={vocab.pos_dim} (C={vocab.codec_dim})")
        tensors[BYTES] = np.ascontiguousarray(vocab.rows, np.uint8)
        tensors[LENGTHS] = np.ascontiguousarray(vocab.lengths, np.int16)
        tensors[FULL_LENGTHS] = np.ascontiguousarray(vocab.full_lengths, np.int32)
        meta.update(vocab_size=str(vocab.vocab_size), vocab_fingerprint=vocab.fingerprint,
                    vocab_source=vocab.source)
    for key, value in (metadata or {}).items():
        if not isinstance(key, str):
            raise InteropError(f"metadata keys must be strings; got {key!r}")
        if key in _RESERVED:
            raise InteropError(f"metadata key {key!r} is reserved (set by export_safetensors)")
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return tensors, meta


def import_safetensors(path: str | os.PathLike
                       ) -> tuple[np.ndarray, ByteVocab | None, dict[str, str]]:
    """Read (W (C, D) float32, ByteVocab or None, metadata) from a kronjax or torch file.

    Accepts a bare `state_dict()` of the PyTorch KroneckerEmbedding (no metadata, no
    vocabulary). Checks shapes against each other and against the metadata, and the
    vocabulary against its recorded fingerprint; errors name the file and what was wrong.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no safetensors file at {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            keys = set(f.keys())
            if WEIGHT not in keys:
                raise InteropError(f"{path} has no {WEIGHT!r} tensor (it holds "
                                   f"{sorted(keys) or 'no tensors'}); expected the torch "
                                   f"layout (d_model, 256 * pos_dim)")
            tensors = {}
            for k in keys & {WEIGHT, BYTES, LENGTHS, FULL_LENGTHS}:
                if f.get_slice(k).get_dtype() == "BF16":  # numpy has no bfloat16 of its own
                    tensors[k] = _read_bf16(path, k)
                else:
                    tensors[k] = f.get_tensor(k)
    except InteropError:
        raise
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise InteropError(f"{path} is not a readable safetensors file (truncated or "
                           f"corrupt?): {e}") from e

    if meta.get("format", FORMAT) != FORMAT:
        raise InteropError(f"{path}: format {meta['format']!r} is not {FORMAT!r}")
    w_DxC = tensors[WEIGHT]
    if w_DxC.ndim != 2:
        raise InteropError(f"{path}: {WEIGHT} must be 2-D (d_model, C); got {w_DxC.shape}")
    if not _is_float(w_DxC.dtype):
        raise InteropError(f"{path}: {WEIGHT} must be floating point; got {w_DxC.dtype}")
    f_dim, d = w_DxC.shape
    pos_dim = _pos_dim_of(d, f"{path}: {WEIGHT} columns (C)")
    _check_meta_int(path, meta, "pos_dim", pos_dim, f"{WEIGHT} has C={d} = 256 * {pos_dim}")
    _check_meta_int(path, meta, "codec_dim", d, f"{WEIGHT} has C={d}")
    _check_meta_int(path, meta, "d_model", f_dim, f"{WEIGHT} has d_model={f_dim}")
    w_CxD = np.ascontiguousarray(w_DxC.astype(np.float32).T)
    return w_CxD, _read_vocab(path, tensors, meta, pos_dim), meta


def _read_vocab(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, str],
                pos_dim: int) -> ByteVocab | None:
    has_rows, has_len = BYTES in tensors, LENGTHS in tensors
    if not has_rows and not has_len:
        if "vocab_fingerprint" in meta:
            raise InteropError(f"{path}: metadata records a vocabulary but the file has no "
                               f"{BYTES!r}/{LENGTHS!r} tensors")
        return None
    if has_rows != has_len:
        missing = LENGTHS if has_rows else BYTES
        raise InteropError(f"{path}: {missing!r} is missing; {BYTES!r} and {LENGTHS!r} "
                           f"come together")
    rows, lengths = tensors[BYTES], tensors[LENGTHS]
    if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != pos_dim:
        raise InteropError(f"{path}: {BYTES} must be (V, pos_dim={pos_dim}) uint8 to match "
                           f"{WEIGHT}; got {rows.shape} {rows.dtype}")
    if lengths.shape != rows.shape[:1] or not np.issubdtype(lengths.dtype, np.integer):
        raise InteropError(f"{path}: {LENGTHS} must be ({rows.shape[0]},) integers; got "
                           f"{lengths.shape} {lengths.dtype}")
    if lengths.size and (lengths.min() < 0 or lengths.max() > pos_dim):
        raise InteropError(f"{path}: {LENGTHS} must lie in [0, {pos_dim}]; got "
                           f"[{lengths.min()}, {lengths.max()}]")
    past_end = np.arange(pos_dim)[None, :] >= lengths[:, None]
    if np.any(rows[past_end] != 0):
        raise InteropError(f"{path}: {BYTES} has non-zero bytes past a token's length")
    full = tensors.get(FULL_LENGTHS)
    if full is None:
        full = lengths.astype(np.int32)
    elif full.shape != lengths.shape:
        raise InteropError(f"{path}: {FULL_LENGTHS} must be {lengths.shape}; got {full.shape}")
    _check_meta_int(path, meta, "vocab_size", rows.shape[0], f"{BYTES} has {rows.shape[0]} rows")
    vocab = ByteVocab(rows.copy(), lengths.astype(np.int16), full.astype(np.int32),
                      meta.get("vocab_source", "safetensors"))
    stored = meta.get("vocab_fingerprint")
    if stored is not None and stored != vocab.fingerprint:
        raise InteropError(f"{path}: vocabulary fingerprint {vocab.fingerprint[:12]} does not "
                           f"match the recorded {stored[:12]}; the file is corrupt or edited")
    return vocab


def _read_bf16(path: Path, key: str) -> np.ndarray:
    """A BF16 tensor (e.g. a bf16 torch model's weight) read raw through ml_dtypes."""
    import ml_dtypes

    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        entry = json.loads(fh.read(n))[key]
        start, end = entry["data_offsets"]
        fh.seek(8 + n + start)
        data = fh.read(end - start)
    if len(data) != end - start:
        raise InteropError(f"{path}: tensor {key!r} is cut short (truncated file?)")
    return np.frombuffer(data, ml_dtypes.bfloat16).reshape(entry["shape"])


def _is_float(dtype: np.dtype) -> bool:
    return bool(np.issubdtype(dtype, np.floating)) or dtype.name == "bfloat16"


def _pos_dim_of(d: int, what: str) -> int:
    if d <= 0 or d % CHAR_DIM:
        raise InteropError(f"{what} = {d} is not a positive multiple of {CHAR_DIM} "
                           f"(C = 256 * pos_dim); is the weight transposed?")
    return d // CHAR_DIM


def _check_meta_int(path: Path, meta: dict[str, str], key: str, actual: int, why: str) -> None:
    if key not in meta:
        return
    try:
        recorded = int(meta[key])
    except ValueError:
        raise InteropError(f"{path}: metadata {key}={meta[key]!r} is not an integer") from None
    if recorded != actual:
        raise InteropError(f"{path}: metadata says {key}={recorded} but {why}")
