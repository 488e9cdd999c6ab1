#!/usr/bin/env bash
# Everything kronjax measures on one GPU, in one go, as JSON files in OUTDIR:
#
#   launch/gpu_report.sh OUTDIR
#
#   attention.json   python -m kronjax.bench attention: cuDNN's fused attention against the
#                    reference at 124M's shape (16 x 1024, 12 x 64, bf16): time, memory and the
#                    largest output and gradient differences
#   step.json        launch/gpu_bench.sh: the 124M train step of the four arms in bf16
#   step_reference_attention.json
#                    the same for bpe_tied and bpe_untied with model.attention=reference (the
#                    step before the fused attention)
#   embed.json       python -m kronjax.bench embed --tokens 65536: the embedding layer alone
#   gpu.txt          nvidia-smi and the versions
#   log.txt          every part's stderr
#
# Each part runs on even if an earlier one failed; the exit status is the number of parts
# that failed. PARTS="attention step" runs only those. PYTHON picks the interpreter.
set -uo pipefail
[[ $# -eq 1 && "$1" != -* ]] || { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
out="$1"
mkdir -p "$out"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
failed=0

part() {  # part NAME COMMAND...: stdout to NAME.json, stderr to log.txt (and the terminal)
  local name="$1"; shift
  [[ " ${PARTS:-attention step step_reference_attention embed} " == *" $name "* ]] || return 0
  echo "[gpu_report] $name: $*" >&2
  local t0=$SECONDS
  if "$@" > "$out/$name.json" 2> >(tee -a "$out/log.txt" >&2); then
    echo "[gpu_report] $name done in $((SECONDS - t0)) s" >&2
  else
    echo "[gpu_report] $name FAILED after $((SECONDS - t0)) s (see $out/log.txt)" >&2
    failed=$((failed + 1))
  fi
}

{ nvidia-smi || true; "$py" -c "import jax, flax, optax; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"; } > "$out/gpu.txt" 2>&1
part attention "$py" -m kronjax.bench attention --json
part step bash launch/gpu_bench.sh --json
part step_reference_attention bash launch/gpu_bench.sh --arms bpe_tied,bpe_untied --json \
  --config.model.attention=reference
part embed "$py" -m kronjax.bench embed --tokens 65536 --reps 10 --no-reference --json
exit "$failed"
