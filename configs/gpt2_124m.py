"""nanoGPT's GPT-2 124M recipe with a tied learned table: the paper's baseline (bpe_tied).

Run (one host):  python -m kronjax.train --config configs/gpt2_124m.py --workdir runs/124m_bpe
Data:            python -m kronjax.data prepare --source hf:HuggingFaceFW/fineweb-edu \
                     --subset sample-10BT --tokenizer tiktoken:gpt2 --max-tokens 2.5e9 \
                     --out DATA; then --config.data.dir=DATA (needs network for the data
                 and the gpt2 encoding; sharded output, rerun to resume an interrupted one).
Scale:           data parallel over every device by default; --config.mesh.data=1
                 --config.mesh.fsdp=-1 shards params and optimizer state; launch/ has the
                 multi-host launchers; --dry_run --topology cpu:8 prints per-device memory
                 without data or devices (docs/scaling.md).
Recipe:          12 layers, 12 heads, d 768, context 1024, vocab 50304 (padded), AdamW
                 lr 6e-4 betas 0.9/0.95, wd 0.1 on matrices only, clip 1.0, 700 warmup steps
                 then cosine to 6e-5; 512 x 1024 = 524,288 tokens per step x 4768 steps
                 = 2.5B tokens, as in the paper.
Expect:          the paper reports validation loss about 3.3 nats at 2.5B tokens on
                 FineWeb-Edu; the kron arm (configs/gpt2_124m_kron.py) 2.5 +- 0.2% lower.
"""

import ml_collections

from kronjax.config import REPO_CONFIGS, load_config_file


def get_config() -> ml_collections.ConfigDict:
    cfg = load_config_file(REPO_CONFIGS / "default.py")
    cfg.data.source = "hf:HuggingFaceFW/fineweb-edu"
    cfg.data.tokenizer = "tiktoken:gpt2"
    cfg.data.eval_batches = 40
    cfg.data.max_tokens = 2_500_000_000   # what 4768 steps read, if train prepares the data
    cfg.model.arm = "bpe_tied"
    cfg.model.n_layer = 12
    cfg.model.n_head = 12
    cfg.model.n_embd = 768
    cfg.model.block_size = 1024
    cfg.model.bias = False
    cfg.model.pos_dim = 16
    cfg.model.dtype = "bfloat16"
    cfg.optim.peak_lr = 6e-4
    cfg.optim.min_lr = 6e-5
    cfg.optim.warmup_steps = 700
    cfg.train.steps = 4768
    cfg.train.batch_size = 512
    cfg.train.grad_accum = 8
    # fused head + cross-entropy over 8192-token chunks: 1.6 GB of float32 logits per chunk
    # instead of 13 GB per 64 x 1024 micro-batch, and few scan steps on a GPU
    cfg.train.ce_chunk = 8192
    cfg.train.eval_every = 250
    cfg.train.checkpoint_every = 500
    cfg.train.log_every = 10
    return cfg
