"""stats: the paired-t interval against scipy, and the pairing the compare design relies on."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from scipy import stats as sp

from kronjax import stats
from kronjax.model import ARMS, GPT, GPTConfig
from kronjax.vocab import ByteVocab

INPUT_SIDE = {"wte", "kron"}  # the only modules that differ between arms


def test_paired_interval_matches_scipy_ttest_rel() -> None:
    a = {0: 3.10, 1: 3.25, 2: 3.02, 3: 3.30}
    b = {0: 3.00, 1: 3.21, 2: 2.95, 3: 3.12, 9: 1.0}  # seed 9 has no partner: left out
    p = stats.paired(a, b)
    d = np.array([b[s] - a[s] for s in range(4)])
    assert p["n"] == 4 and p["df"] == 3
    assert p["per_seed"] == pytest.approx({str(s): d[s] for s in range(4)})
    assert p["diff"] == pytest.approx(d.mean())
    res = sp.ttest_rel([b[s] for s in range(4)], [a[s] for s in range(4)])
    lo, hi = res.confidence_interval(0.95)
    assert p["ci95"] == pytest.approx([lo, hi])
    # The paired interval is narrower than Welch's here: the seeds move both arms together.
    w = stats.welch(list(a.values()), [b[s] for s in range(4)])
    assert p["ci95"][1] - p["ci95"][0] < w["ci95"][1] - w["ci95"][0]


def test_paired_edge_cases() -> None:
    assert stats.paired({0: 1.0}, {0: 2.0})["ci95"] is None
    same = stats.paired({0: 1.0, 1: 2.0}, {0: 1.5, 1: 2.5})
    assert same["ci95"] == pytest.approx([0.5, 0.5]) and "zero variance" in same["method"]
    with pytest.raises(ValueError, match="no seed in common"):
        stats.paired({0: 1.0}, {1: 1.0})


def test_same_seed_same_init_outside_the_input_side() -> None:
    """compare's paired design: arms differ only in the input side (and a tied arm's lack of a
    head); every other parameter is drawn identically for the same seed."""
    toks = [bytes([i]) for i in range(256)] + [b"ab", b"the", b" and"]
    vocab = ByteVocab.from_bytes(toks, pos_dim=4).pad_to(320)
    ids = jnp.zeros((1, 8), jnp.int32)
    trees = {}
    for arm in ARMS:
        cfg = GPTConfig(vocab_size=320, block_size=8, n_layer=2, n_head=2, n_embd=32, arm=arm,
                        pos_dim=4)
        params = nn.meta.unbox(GPT(cfg, vocab).init(jax.random.key(7), ids)["params"])
        trees[arm] = flatten_dict(params, sep="/")
    ref = trees["bpe_untied"]
    for arm, tree in trees.items():
        shared = {k for k in tree if k.split("/")[0] not in INPUT_SIDE}
        assert shared <= set(ref)
        assert ("lm_head" in {k.split("/")[0] for k in tree}) == (arm in ("bpe_untied", "kron"))
        for k in shared:
            np.testing.assert_array_equal(tree[k], ref[k], err_msg=f"{arm}: {k}")
    # and the seed matters: another seed draws other blocks
    cfg = GPTConfig(vocab_size=320, block_size=8, n_layer=2, n_head=2, n_embd=32,
                    arm="bpe_untied", pos_dim=4)
    other = flatten_dict(nn.meta.unbox(GPT(cfg, vocab).init(jax.random.key(8), ids)["params"]),
                         sep="/")
    k = next(k for k in ref if k.startswith("h_0/") and k.endswith("kernel"))
    assert not np.array_equal(other[k], ref[k])
