"""A seconds-long config for tests and smoke runs: 2 layers, d 32, context 32.

Run:     python -m kronjax.train --config configs/tiny.py --workdir /tmp/tiny
Data:    Python's own pydoc topics (no download), a 512-piece sentencepiece BPE.
Expect:  finishes in under a minute on 2 CPU cores; the loss starts at ln(512) = 6.24
         nats and drops below 5 within 40 steps. It checks plumbing, not quality.
"""

import ml_collections

from kronjax.config import REPO_CONFIGS, load_config_file


def get_config() -> ml_collections.ConfigDict:
    cfg = load_config_file(REPO_CONFIGS / "default.py")
    cfg.data.source = "pydoc"
    cfg.data.sp_vocab_size = 512
    cfg.data.eval_batches = 2
    cfg.model.n_layer = 2
    cfg.model.n_head = 2
    cfg.model.n_embd = 32
    cfg.model.block_size = 32
    cfg.model.pos_dim = 8
    cfg.optim.peak_lr = 1e-2
    cfg.optim.min_lr = 1e-3
    cfg.optim.warmup_steps = 5
    cfg.train.steps = 40
    cfg.train.batch_size = 8
    cfg.train.eval_every = 20
    cfg.train.checkpoint_every = 20
    cfg.train.log_every = 5
    cfg.train.progress = False
    return cfg
