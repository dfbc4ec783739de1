#!/usr/bin/env bash
# Build the interface packages into the venv with the pip rosidl wheels (pip-only machines).
# On a full ROS 2 install use colcon instead (see README).
set -euo pipefail
VENV=$(cd "${1:-.venv}" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export AMENT_PREFIX_PATH="$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export PATH="$VENV/bin:$PATH"
pkgs=()
# vision_msgs, tf2_msgs: use the real package when it is importable (e.g. a sourced ROS
# install); build our field-identical copy where it is absent (or where we built it before).
for copy in vision_msgs tf2_msgs; do
  if ! "$VENV/bin/python" -c "import $copy.msg" 2>/dev/null || \
     [ -f "$VENV/share/$copy/.perception2d_copy" ]; then
    pkgs+=("$copy")
  fi
done
pkgs+=(perception2d_interfaces)
mkdir -p "$ROOT/build"
for pkg in "${pkgs[@]}"; do
  echo "    building $pkg ..."
  t0=$SECONDS
  cmake -S "$ROOT/interfaces/$pkg" -B "$ROOT/build/$pkg" -DCMAKE_PREFIX_PATH="$VENV" \
    -DCMAKE_INSTALL_PREFIX="$VENV" -DPython3_EXECUTABLE="$VENV/bin/python" \
    -DBUILD_TESTING=OFF > "$ROOT/build/$pkg.log" 2>&1 \
  && cmake --build "$ROOT/build/$pkg" -j"$(nproc)" >> "$ROOT/build/$pkg.log" 2>&1 \
  && cmake --install "$ROOT/build/$pkg" >> "$ROOT/build/$pkg.log" 2>&1 \
  || { echo "build of $pkg failed; last lines of build/$pkg.log:"; tail -30 "$ROOT/build/$pkg.log"; exit 1; }
  case "$pkg" in vision_msgs|tf2_msgs) touch "$VENV/share/$pkg/.perception2d_copy" ;; esac
  echo "    $pkg built in $((SECONDS - t0)) s"
done
