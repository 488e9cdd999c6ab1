#!/usr/bin/env bash
# Everything kronjax measures on one GPU, in one go, within a time budget, as files in OUTDIR:
#
#   launch/gpu_report.sh [--budget-s 420] [--parts a,b] [--cpu-smoke] OUTDIR
#
#   gpu.txt             nvidia-smi and the versions
#   summary.json        each part's status and seconds, the GPU test counts, the targets
#                       (kron/bpe_untied step <= 1.003, kron embedding <= 1.5x nn.Embed,
#                       bpe_tied MFU >= 50%, kron peak memory <= bpe_untied's)
#   step.json           the 124M train step of the four arms (16 x 1024, bf16)
#   embed.json          the embedding layer: nn.Embed, the codec in each GPU form
#   attention.json      cuDNN, Pallas Triton, cuDNN BNTH, Mosaic GPU (forward) vs the reference
#   embed_ftz.json      embed.json's arms with -nvptx-allow-ftz-atomics
#   step_variants.json  kron with the other GPU codec forms; bpe_untied with Pallas Triton
#   log.txt             every part's stderr
#
# That is 8 files, what the device tool returns at most. A part that fails or overruns its cap
# writes an error object instead and the next part runs; the budget (default 420 s, 7 min)
# bounds the whole (python -m kronjax.bench report --help lists the parts). The exit status is
# the number of failed parts. If .whl/ holds wheels (launch/gpu_wheels.sh, run where PyPI is
# reachable), they are installed first into a temporary target for this run. --cpu-smoke runs
# every part at tiny shapes on the CPU: a check of the script, no measurement.
# PYTHON picks the interpreter (default python3).
set -uo pipefail
usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 1 && "${!#}" != -* ]] || usage
out="${!#}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"

if compgen -G ".whl/*.whl" > /dev/null; then
  site="${TMPDIR:-/tmp}/kronjax-wheels"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl >> "$out/log.txt" 2>&1 \
    && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" \
    || echo "[gpu_report] .whl/ not installed (see log.txt); going on with this python's packages" >&2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{ date; nvidia-smi || echo "(no nvidia-smi)"
  "$py" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__)"; } > "$out/gpu.txt" 2>&1
"$py" -m kronjax.bench report "$@" 2> >(tee -a "$out/log.txt" >&2)
rc=$?
wait
exit "$rc"
