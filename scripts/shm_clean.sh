#!/usr/bin/env bash
# Remove Fast DDS shared-memory segments left in /dev/shm by processes that died without
# cleaning up (each holds up to 64 MiB of RAM). Segments of live processes are kept.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV="${P2D_VENV:-$ROOT/.venv}"
tool="$VENV/tools/fastdds/fastdds.py"
[ -f "$tool" ] || exit 0
timeout 120 "$VENV/bin/python" "$tool" shm clean >/dev/null 2>&1 || true
