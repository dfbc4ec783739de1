#!/usr/bin/env bash
# Run the whole suite with sandbox-safe DDS settings; inside a private network namespace
# (loopback only) when the machine allows it. Two pytest processes: the fast tests, then
# the model export/parity tests (marker `slow`), so that no one process holds every model
# (the SAM ViT-B export + parity alone peaks at ~15 GB on this 24 GB machine).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source scripts/ros_env.sh
bash scripts/shm_clean.sh
run() {
  local cmd=(.venv/bin/python -m pytest "$@")
  if command -v unshare >/dev/null && unshare -rn true 2>/dev/null; then
    unshare -rn bash -c 'ip link set lo up 2>/dev/null || true; exec "$@"' _ "${cmd[@]}"
  else
    "${cmd[@]}"
  fi
}
if [ "$#" -gt 0 ]; then
  run "$@"; rc=$?
else
  run -m "not slow"; rc1=$?
  bash scripts/shm_clean.sh
  run -m slow; rc2=$?
  rc=$(( rc1 != 0 ? rc1 : rc2 ))
fi
bash scripts/shm_clean.sh
exit $rc
