#!/usr/bin/env bash
# Run the whole suite with sandbox-safe DDS settings; inside a private network namespace
# (loopback only) when the machine allows it.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source scripts/ros_env.sh
cmd=(.venv/bin/python -m pytest "$@")
if command -v unshare >/dev/null && unshare -rn true 2>/dev/null; then
  exec unshare -rn bash -c 'ip link set lo up 2>/dev/null || true; exec "$@"' _ "${cmd[@]}"
fi
exec "${cmd[@]}"
