#!/usr/bin/env bash
# Run one command on every host of a Cloud TPU VM slice (one process per host).
#
#   launch/tpu_pod.sh [--setup | --dry-run] TPU_NAME ZONE --type TYPE [--project P] -- COMMAND...
#
# COMMAND runs in $KRONJAX_DIR (default: kronjax, under each worker's home) on all workers
# at once, through `gcloud compute tpus tpu-vm ssh --worker=all`. Pass --distributed to
# kronjax.train so every host calls jax.distributed.initialize() (JAX finds the slice's
# coordinator itself on Cloud TPU). --setup first copies this checkout to every worker and
# installs it with TPU JAX (pip install -e '.[hf,tpu]').
#
# --type is the slice's accelerator type exactly as `gcloud ... --accelerator-type` writes it
# (v4-8, v4-32, v5litepod-16, v5p-128, v6e-8). --dry-run runs nothing remotely: it runs
# COMMAND here with `--dry_run --topology TYPE` added (and --distributed dropped), which
# compiles the step for that slice with libtpu (pip install -e '.[tpu]') and prints the
# memory per chip against its HBM. The same line with and without --dry-run: check, then run.
#
# The hosts share no disk and orbax writes one checkpoint from all of them, so --workdir is a
# gs:// bucket (spot and queued VMs lose their disks when preempted); data.dir can be one too:
# prepared once (`python -m kronjax.data prepare ... --out gs://...`), copied by every host
# into its own cache and verified. Filestore/NFS paths work as well.
#
# Example (a v4-32: 4 hosts x 4 chips = 16 devices, fully sharded over fsdp):
#   launch/tpu_pod.sh my-v4-32 us-central2-b --type v4-32 -- python -m kronjax.train \
#       --config configs/gpt2_124m_kron.py --workdir gs://my-bucket/runs/124m_kron \
#       --distributed --config.data.dir=gs://my-bucket/data/fineweb_edu_gpt2 \
#       --config.mesh.data=1 --config.mesh.fsdp=-1
set -euo pipefail

usage() {
  sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

setup=0
dry_run=0
if [[ "${1:-}" == "--setup" ]]; then setup=1; shift; fi
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
[[ $# -ge 2 ]] || usage
tpu=$1
zone=$2
shift 2
gcloud_args=(--zone "$zone")
type=""
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --project) gcloud_args+=(--project "${2:?--project needs a value}"); shift 2 ;;
    --type) type="${2:?--type needs an accelerator type such as v4-32}"; shift 2 ;;
    *) usage ;;
  esac
done
[[ "${1:-}" == "--" ]] || usage
shift
[[ $# -ge 1 ]] || usage
dir="${KRONJAX_DIR:-kronjax}"

if ((dry_run)); then
  [[ -n "$type" ]] || { echo "tpu_pod.sh: --dry-run needs --type (e.g. --type v4-32)" >&2; exit 2; }
  local_cmd=()
  for a in "$@"; do [[ "$a" == "--distributed" ]] || local_cmd+=("$a"); done
  exec "${local_cmd[@]}" --dry_run --topology "$type"
fi

if ((setup)); then
  repo="$(cd "$(dirname "$0")/.." && pwd)"
  tarball="$(mktemp -t kronjax.XXXXXX.tar.gz)"
  trap 'rm -f "$tarball"' EXIT
  git -C "$repo" ls-files -z --cached --others --exclude-standard \
    | tar -C "$repo" --null -T - -czf "$tarball"
  gcloud compute tpus tpu-vm scp "$tarball" "$tpu:kronjax.tar.gz" --worker=all "${gcloud_args[@]}"
  gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${gcloud_args[@]}" --command \
    "mkdir -p $dir && tar -C $dir -xzf kronjax.tar.gz && cd $dir && pip install -q -e '.[hf,tpu]'"
fi

printf -v cmd '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${gcloud_args[@]}" --command "cd $dir && $cmd"
