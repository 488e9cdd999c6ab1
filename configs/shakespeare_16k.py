"""Regime 2 of the deciding experiment: a vocabulary 4x the codec width, table short of data.

Run:     python -m kronjax.compare --config configs/shakespeare_16k.py --seeds 3
             --arms bpe_untied,bpe_tied,kron,kron_tied --reference bpe_untied,bpe_tied
             --out runs/regime2
         (one arm: python -m kronjax.train --config configs/shakespeare_16k.py
             --config.model.arm=bpe_untied --workdir runs/16k_bpe_untied)
Differs from configs/default.py in the vocabulary and the budget only: a 16,384-piece
sentencepiece BPE trained on the same Shakespeare (so V = 4 x C, C = 256 x 16 = 4096: the
projection W has 1,048,576 parameters against the table's 4,194,304), and 100 steps of
16 x 128 tokens (0.2M tokens, 0.13 of an epoch of its 1.52M; warmup 20), so most table
rows see few updates.
Expect:  about 2-3 minutes a run on 2 idle CPU cores; docs/results.md ("Regime 2") has the
         measured values per arm and seed.
4x data: add --config.train.steps=400 (0.82M tokens): kron - bpe_untied closes from -0.216
         nats at 51k tokens to +0.007 [-0.060, +0.074] at the end (docs/results.md, "Regime 2
         over 4x the data"). Equal parameters: configs/shakespeare_16k_matched.py.
"""

import ml_collections

from kronjax.config import REPO_CONFIGS, load_config_file


def get_config() -> ml_collections.ConfigDict:
    cfg = load_config_file(REPO_CONFIGS / "default.py")
    cfg.data.sp_vocab_size = 16384
    cfg.train.steps = 100
    cfg.train.batch_size = 16
    cfg.optim.warmup_steps = 20
    cfg.train.eval_every = 25
    cfg.train.checkpoint_every = 100
    return cfg
