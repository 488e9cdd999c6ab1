#!/usr/bin/env bash
# Run N processes of one command on this machine as one multi-host JAX job.
#
#   launch/local.sh N [-d DEVICES_PER_PROCESS] [-p PORT] -- COMMAND [ARGS...]
#
# Process i gets KRONJAX_COORDINATOR=127.0.0.1:PORT, KRONJAX_NUM_PROCESSES=N and
# KRONJAX_PROCESS_ID=i; kronjax.train reads them and calls
# jax.distributed.initialize("127.0.0.1:PORT", N, i) with gloo CPU collectives, so this
# exercises the real multi-host path (per-process data, collective checkpoints) on one box.
# -d D simulates D CPU devices per process (XLA_FLAGS, JAX_PLATFORMS=cpu). PORT defaults to
# a free one. Output lines are prefixed with [i]. Exits 0 when every process does; on the
# first failure the others are stopped and its status is returned. SIGINT/SIGTERM are passed
# on to every process (kronjax saves a checkpoint at JAX's preemption sync point).
#
# Example (2 processes x 2 CPU devices = a 4-device mesh):
#   launch/local.sh 2 -d 2 -- python -m kronjax.train --config configs/tiny.py --workdir /tmp/mh
set -uo pipefail

usage() {
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

[[ $# -ge 1 && "$1" =~ ^[0-9]+$ && "$1" -ge 1 ]] || usage
n=$1
shift
devices=""
port="${KRONJAX_PORT:-}"
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    -d) devices="${2:-}"; [[ "$devices" =~ ^[0-9]+$ ]] || usage; shift 2 ;;
    -p) port="${2:-}"; [[ "$port" =~ ^[0-9]+$ ]] || usage; shift 2 ;;
    *) usage ;;
  esac
done
[[ "${1:-}" == "--" ]] || usage
shift
[[ $# -ge 1 ]] || usage

if [[ -z "$port" ]]; then
  port=$("${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

declare -A live=()
for ((i = 0; i < n; i++)); do
  (
    export KRONJAX_COORDINATOR="127.0.0.1:${port}" KRONJAX_NUM_PROCESSES="$n" KRONJAX_PROCESS_ID="$i"
    if [[ -n "$devices" ]]; then
      export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"
      export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
    fi
    exec "$@"
  ) > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  live[$!]=$i
done

stop_all() {
  for pid in "${!live[@]}"; do kill -s "$1" "$pid" 2>/dev/null; done
}
trap 'stop_all TERM' TERM
trap 'stop_all INT' INT

status=0
while ((${#live[@]} > 0)); do
  finished=""
  wait -n -p finished "${!live[@]}"
  rc=$?
  [[ -n "$finished" ]] || continue  # a trapped signal interrupted wait; the processes go on
  unset "live[$finished]"
  if ((rc != 0 && status == 0)); then
    status=$rc
    echo "local.sh: a process exited with status $rc; stopping the others" >&2
    stop_all TERM
  fi
done
wait  # let the output prefixers drain
exit "$status"
