"""Benchmarks: the embedding layer alone (`embed`), the full train step (`step`), this
platform's attention kernel against the reference (`attention`), the step compiled for
TPU slices on any host (`tpu`: memory per chip, largest micro-batch, XLA cost ratios), and
checkpoints and data on local disk against a gs:// bucket (`storage`).

    python -m kronjax.bench embed [--vocab 50304] [--d-model 768] [--tokens 16384]
                                  [--pos-dim 16] [--reps 10] [--json]

`embed` times value_and_grad of loss = sum(embed(ids) * g) (g a fixed random cotangent)
w.r.t. the parameters, jitted, for flax `nn.Embed(V, d)` and `KroneckerEmbed` in modes
sparse / bytes / dense, plus the authors' PyTorch `KroneckerEmbedding` (modes dynamic and
cached) when torch and kronecker-embeddings are importable. Ids are real text (a bundled
corpus through tiktoken cl100k_base), taken modulo --vocab, repeated to --tokens.

Timing: every arm is compiled and warmed up first, then the arms are timed in interleaved
rounds (one call of each per round), so that load from other processes on the machine falls
on all arms alike; median and interquartile range over the rounds. Ratios are
time(arm) / time(baseline): below 1 is faster.

    python -m kronjax.bench step [--config FILE] [--arms bpe_tied,bpe_untied,kron,kron_tied]
                                 [--reps 10] [--torch] [--json] [--config.a.b=value ...]

`step` is described in kronjax.bench.step.STEP_DOC (python -m kronjax.bench step --help).

    python -m kronjax.bench attention [--batch 16] [--seq 1024] [--heads 12] [--head-dim 64]
    python -m kronjax.bench tpu [--config FILE] [--types v4-8,...] [--arms ...] [--json]
    python -m kronjax.bench storage --url gs://BUCKET/PREFIX [--config FILE] [--reps 3]
    python -m kronjax.bench report OUTDIR   (every GPU measurement: launch/gpu_report.sh)
    python -m kronjax.bench startup [--config configs/tiny.py] [--reps 3] [--compare]

`startup` times fresh processes to their first step (and a whole compare) with the
persistent compilation cache off, cold and warm (kronjax.bench.startup).

Modules: timing (machine, interleaved rounds, memory), embed, step, torch_step (nanoGPT in
PyTorch), attention, tpu, storage, report, startup, cli.
"""

from kronjax.bench.cli import build_parser, main
from kronjax.bench.embed import (
                                 EMBED_BASELINE,
                                 REF_BASELINE,
                                 corpus_ids,
                                 format_embed_table,
                                 run_embed,
)
from kronjax.bench.step import (
                                 STEP_ARMS,
                                 STEP_BASELINE,
                                 format_step_table,
                                 jax_step_arm,
                                 run_step,
                                 step_vocab,
)
from kronjax.bench.timing import Arm, StepArm, machine_info, machine_line, time_interleaved

__all__ = ["Arm", "EMBED_BASELINE", "REF_BASELINE", "STEP_ARMS", "STEP_BASELINE", "StepArm",
           "build_parser", "corpus_ids", "format_embed_table",
           "format_step_table", "jax_step_arm", "machine_info", "machine_line", "main",
           "run_embed", "run_step", "step_vocab", "time_interleaved"]
