"""The tokenizer-freedom experiment's source runs (python -m kronjax.retokenize): small enough
that 4 arms x 3 seeds x 2 vocabularies train in minutes on a shared 2-core CPU.

Run:     python -m kronjax.compare --config configs/retokenize_small.py --seeds 3
             --arms bpe_untied,bpe_tied,kron,kron_tied --out runs/retok/v4k
         (the 16,384-piece sources: add --config.data.sp_vocab_size=16384)
         then python -m kronjax.retokenize.experiment (docs/results.md, "Tokenizer freedom").
Differs from configs/default.py in size only: 2 layers, d 128, 200 steps of 16 x 128 tokens
(0.41M tokens, warmup 20); the codec is the default's (pos_dim 16, C = 4096).
Expect:  about a minute a run on 2 idle CPU cores; val loss near 4.9 nats for kron at 4096.
"""

import ml_collections

from kronjax.config import REPO_CONFIGS, load_config_file


def get_config() -> ml_collections.ConfigDict:
    cfg = load_config_file(REPO_CONFIGS / "default.py")
    cfg.model.n_layer = 2
    cfg.model.n_embd = 128
    cfg.train.steps = 200
    cfg.train.batch_size = 16
    cfg.optim.warmup_steps = 20
    cfg.train.eval_every = 50
    cfg.train.checkpoint_every = 200
    cfg.train.progress = False
    return cfg
