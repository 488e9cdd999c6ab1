"""Regime 2 at equal total parameters: kron spends the input-side parameters it saves on depth.

Run:     python -m kronjax.compare --config configs/shakespeare_16k_matched.py
             --arms bpe_untied,kron_8l --seeds 3 --out runs/regime2_matched
         (one row: python -m kronjax.train --config configs/shakespeare_16k_matched.py
             --config.model.arm=kron --config.model.n_layer=8 --workdir runs/16k_kron_8l_s0)
Result:  MEASURED_RESULT
The config is configs/shakespeare_16k.py unchanged (so `bpe_untied` here is regime 2's table
arm, run for run); it adds the variant kron_8l = kron with 8 layers instead of 4. At d 256,
bias off, a block has 4d^2 (attention) + 8d^2 (MLP) + 2d (LayerNorm scales) = 786,944
parameters. W (4096 x 256 = 1,048,576) saves 3,145,728 against the 16,384 x 256 table; four
more blocks spend 3,147,776 of it, so the totals are 11,571,456 (kron_8l) against 11,569,408
(bpe_untied): 0.02% apart. The block stack costs twice the flops per token: 66.1 against
45.6 MFLOP per token for training in all (6N + attention, kronjax.metrics.flops_per_token).
Expect:  2.5-3 minutes a bpe_untied run and about twice that a kron_8l run on 2 CPU cores.
"""

from typing import Any

import ml_collections

from kronjax.config import load_config_file, REPO_CONFIGS


def get_config() -> ml_collections.ConfigDict:
    return load_config_file(REPO_CONFIGS / "shakespeare_16k.py")


def get_variants() -> dict[str, dict[str, Any]]:
    """Named arms with their own settings, for `--arms` (kronjax/variants.py)."""
    return {"kron_8l": {"model.arm": "kron", "model.n_layer": 8}}
