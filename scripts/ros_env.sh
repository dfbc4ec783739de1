# Source me: sandbox-safe ROS 2 environment for the pip-only venv.
_P2D_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_P2D_VENV="${P2D_VENV:-$_P2D_ROOT/.venv}"
export AMENT_PREFIX_PATH="$_P2D_VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
# Discovery stays on this machine (Kilted ignores ROS_LOCALHOST_ONLY).
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
# A domain of our own per run unless the user chose one.
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( ($$ % 100) + 1 ))}"
# SHM transport sized for images; without it best-effort images are dropped between processes.
export FASTDDS_DEFAULT_PROFILES_FILE="${FASTDDS_DEFAULT_PROFILES_FILE:-$_P2D_ROOT/config/fastdds_localhost_shm.xml}"
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
export PYTHONUNBUFFERED=1
