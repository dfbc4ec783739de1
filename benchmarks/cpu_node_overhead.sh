#!/usr/bin/env bash
# CPU results of docs/BENCHMARKS.md "Node overhead and long runs" (issue: performance where
# users run it). Writes docs/results/cpu_*.json; every file carries the commit, library
# versions, machine and load average of its run.
#   bash benchmarks/cpu_node_overhead.sh            stage benches + DDS hop (~3 min)
#   bash benchmarks/cpu_node_overhead.sh --soak     + two 30-minute soaks (pipeline, nodes)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=docs/results
bench() { bash scripts/run_with_ros_env.sh .venv/bin/python -m perception2d_ros.cli.main \
    bench "$@"; }
for i in 1 2 3; do
  echo "==> stage benches, round $i/3 (rectify, detect at 1280x720, 100 frames)"
  bench rectify --json --out "$OUT/cpu_bench_rectify_$i.json" >/dev/null
  bench detect --json --out "$OUT/cpu_bench_detect_$i.json" >/dev/null
done
for size in 1280x720 1920x1080; do
  echo "==> rectify over DDS + one image hop between processes at $size"
  bench rectify --dds --size "$size" --frames 60 --json --out "$OUT/cpu_dds_hop_$size.json" \
    >/dev/null
done
if [ "${1:-}" = "--soak" ]; then
  for mode in pipeline nodes; do
    echo "==> 30-minute soak, $mode mode, 1920x1080 rectify + detect at 30 Hz"
    bench --overload --rate 30 --duration 1800 --mode "$mode" --json \
      --out "$OUT/cpu_soak_${mode}_30min.json" >/dev/null
  done
fi
