#!/usr/bin/env bash
# The train-step benchmark of GPT-2 124M (configs/gpt2_124m.py) on one GPU, four arms side by
# side: bpe_untied (the baseline of the ratios), kron, bpe_tied, kron_tied.
#
#   launch/gpu_bench.sh [--reps N] [--json] [--config.a.b=value ...]
#
# One step = one micro-batch of 16 x 1024 tokens in bfloat16 (train.batch_size=16,
# train.grad_accum=1): the full step (forward, backward, AdamW) of each arm, compiled, warmed
# up 3 times, then 10 interleaved timed rounds; prints tokens/s, MFU (against the chip's peak
# in kronjax.metrics.PEAK_FLOPS) and per-device memory from the compiled step. Ids are random;
# the kron arms' token bytes are the GPT-2 tokenizer's when its data is prepared, else a
# stand-in of 50257 real BPE tokens (cl100k_base's first ids, no network), else synthetic
# (the table says which). Budget: about 1 minute of compiles and seconds of steps on an H100
# or H200; well under 5 minutes.
#
# Arguments are passed on to `python -m kronjax.bench step` after the defaults above, so they
# win: e.g. --config.train.batch_size=8 on a smaller GPU, --arms kron,bpe_untied, or
# --config.train.ce_chunk=0 for the unfused head + cross-entropy (full B x T x V logits).
# KRONJAX_BENCH_ALLOW_CPU=1 skips the GPU check (a dry run of the Python part on CPU with tiny
# overrides, as tests/test_bench.py does). PYTHON picks the interpreter (default python3).
set -euo pipefail

usage() {
  sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && usage

cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
if [[ "${KRONJAX_BENCH_ALLOW_CPU:-0}" != "1" ]]; then
  "$py" - <<'PYCHECK' || exit 1
import sys
import jax
if jax.default_backend() != "gpu":
    sys.exit(f"launch/gpu_bench.sh: no GPU (JAX's backend is {jax.default_backend()!r}); "
             "install jax[cuda12] (or cuda13), or set KRONJAX_BENCH_ALLOW_CPU=1 for a dry run")
print(f"[gpu_bench] {jax.devices()[0].device_kind}, jax {jax.__version__}", file=sys.stderr)
PYCHECK
fi

# One GPU (the first, unless CUDA_VISIBLE_DEVICES says otherwise): the numbers are per chip.
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
exec "$py" -m kronjax.bench step --config configs/gpt2_124m.py \
  --arms bpe_untied,kron,bpe_tied,kron_tied --reps 10 --warmup 3 \
  --config.train.batch_size=16 --config.train.grad_accum=1 --config.model.dtype=bfloat16 \
  "$@"
