"""Regime 2 at equal total parameters: kron spends the input-side parameters it saves on depth.

Run:     python -m kronjax.compare --config configs/shakespeare_16k_matched.py
             --arms bpe_untied,kron,kron_8l --reference bpe_untied,kron --seeds 3
             --out runs/regime2_matched
         (one row: python -m kronjax.train --config configs/shakespeare_16k_matched.py
             --config.model.arm=kron --config.model.n_layer=8 --workdir runs/16k_kron_8l_s0
          gives kron_8l seed 0 exactly: val loss 5.2749 nats, 2.3458 bits/byte)
Result:  final val loss over 3 paired seeds (docs/results.md, "Regime 2 at equal
         parameters"): bpe_untied 5.3057 ± 0.0436, kron 5.2538 ± 0.0180, kron_8l
         5.2879 ± 0.0120 nats. kron_8l - bpe_untied = -0.018 nats, 95% paired interval
         [-0.099, +0.063]: at equal total parameters kron is not better than the table, and
         8 layers are worse than kron's own 4 (+0.034 [-0.010, +0.078], every seed).
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

from kronjax.config import REPO_CONFIGS, load_config_file


def get_config() -> ml_collections.ConfigDict:
    return load_config_file(REPO_CONFIGS / "shakespeare_16k.py")


def get_variants() -> dict[str, dict[str, Any]]:
    """Named arms with their own settings, for `--arms` (kronjax/variants.py)."""
    return {"kron_8l": {"model.arm": "kron", "model.n_layer": 8}}
