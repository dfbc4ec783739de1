#!/usr/bin/env bash
set -euo pipefail
source "$(dirname "$0")/ros_env.sh"
exec "$@"
