#!/usr/bin/env bash
# Run one command on every host of a Cloud TPU VM slice (one process per host).
#
#   launch/tpu_pod.sh [--setup] TPU_NAME ZONE [--project P] -- COMMAND [ARGS...]
#
# COMMAND runs in $KRONJAX_DIR (default: kronjax, under each worker's home) on all workers
# at once, through `gcloud compute tpus tpu-vm ssh --worker=all`. Pass --distributed to
# kronjax.train so every host calls jax.distributed.initialize() (JAX finds the slice's
# coordinator itself on Cloud TPU). --setup first copies this checkout to every worker and
# installs it with TPU JAX (pip install -e '.[hf]' 'jax[tpu]').
#
# Every host must read the same prepared data and write one shared checkpoint directory:
# put data.dir and --workdir on shared storage (Filestore/NFS), or prepare the data on every
# host with the same command (prepare is deterministic, so the copies are identical).
#
# Example (a v4-32: 4 hosts x 4 chips = 16 devices, fully sharded over fsdp):
#   launch/tpu_pod.sh my-v4-32 us-central2-b -- python -m kronjax.train \
#       --config configs/gpt2_124m_kron.py --workdir /mnt/shared/runs/124m_kron --distributed \
#       --config.data.dir=/mnt/shared/data/fineweb_edu_gpt2 --config.mesh.data=1 \
#       --config.mesh.fsdp=-1
set -euo pipefail

usage() {
  sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

setup=0
if [[ "${1:-}" == "--setup" ]]; then setup=1; shift; fi
[[ $# -ge 2 ]] || usage
tpu=$1
zone=$2
shift 2
gcloud_args=(--zone "$zone")
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --project) gcloud_args+=(--project "${2:?--project needs a value}"); shift 2 ;;
    *) usage ;;
  esac
done
[[ "${1:-}" == "--" ]] || usage
shift
[[ $# -ge 1 ]] || usage
dir="${KRONJAX_DIR:-kronjax}"

if ((setup)); then
  repo="$(cd "$(dirname "$0")/.." && pwd)"
  tarball="$(mktemp -t kronjax.XXXXXX.tar.gz)"
  trap 'rm -f "$tarball"' EXIT
  git -C "$repo" ls-files -z --cached --others --exclude-standard \
    | tar -C "$repo" --null -T - -czf "$tarball"
  gcloud compute tpus tpu-vm scp "$tarball" "$tpu:kronjax.tar.gz" --worker=all "${gcloud_args[@]}"
  gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${gcloud_args[@]}" --command \
    "mkdir -p $dir && tar -C $dir -xzf kronjax.tar.gz && cd $dir && pip install -q -e '.[hf]' 'jax[tpu]'"
fi

printf -v cmd '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${gcloud_args[@]}" --command "cd $dir && $cmd"
