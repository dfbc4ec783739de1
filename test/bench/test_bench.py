"""Smoke test of the benchmark harness (``perception2d bench``): it runs end to end and its
JSON is sane. No timing thresholds here — speed targets live in docs/BENCHMARKS.md and are
measured with the harness, not asserted in unit tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="the bench drives real nodes (installed by `make test`)")

pytestmark = pytest.mark.ros

REPO = Path(__file__).resolve().parents[2]


def bench(*args: str, timeout: float = 240.0) -> dict:
    """``perception2d bench ARGS --json`` in a subprocess (its own rclpy, its own DDS domain
    settings inherited from conftest); returns the parsed JSON from stdout."""
    cmd = [sys.executable, "-m", "perception2d_ros.cli.main", "bench", *args, "--json"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def check_stage(r: dict, stage: str, frames: int) -> None:
    for key in ("stage", "floor_ms", "stage_ms", "ratio", "p50_ms", "p95_ms", "machine",
                "backend", "model", "frames", "included", "breakdown_ms_p50"):
        assert key in r, f"missing {key}: {sorted(r)}"
    assert r["stage"] == stage
    assert r["frames"] == frames
    assert r["floor_ms"] > 0 and r["stage_ms"] > 0
    assert r["p95_ms"] >= r["p50_ms"] > 0
    assert r["ratio"] == pytest.approx(r["stage_ms"] / r["floor_ms"], rel=2e-3, abs=2e-3)
    assert r["machine"]["cores"] >= 1 and r["machine"]["date"]
    assert r["size"] == "1280x720"


def test_bench_rectify_json():
    r = bench("rectify", "--frames", "5", "--warmup", "1")
    check_stage(r, "rectify", 5)
    assert r["backend"] == "opencv"
    assert set(r["outputs"]) >= {"image_rect", "camera_info_rect"}
    # the second floor: remap + rclpy's own publish of the same image
    assert r["floor_with_publish_ms"] > r["floor_ms"]
    assert r["floor_parts_ms_p50"]["rclpy_publish"] > 0


def test_bench_detect_json():
    r = bench("detect", "--frames", "3", "--warmup", "1")
    check_stage(r, "detect", 3)
    assert r["model"] == "yolox_nano"
    assert r["backend"].startswith("onnxruntime")
    assert r["breakdown_ms_p50"]["detector_infer"] > 0


def test_bench_model_stage_without_weights_is_skipped(tmp_path):
    # an empty models directory: no SAM weights, so a clear skip instead of a crash
    (tmp_path / "manifest.yaml").write_text((REPO / "models" / "manifest.yaml").read_text())
    r = bench("sam", "--models-dir", str(tmp_path), timeout=60)
    assert r["stage"] == "sam"
    assert "no weights" in r["skipped"]


def test_bench_overload_short(tmp_path):
    """A short soak: an artificially slow stage (+60 ms) fed at 30 Hz. Newest-wins must drop
    frames instead of queueing them, and the result must carry the soak fields."""
    out = tmp_path / "overload.json"
    r = bench("--overload", "--rate", "30", "--duration", "4", "--size", "640x360",
              "--slow-ms", "60", "--out", str(out))
    assert json.loads(out.read_text())["bench"] == "overload"
    for key in ("latency_p95_ms", "stage_ms_p50", "rss_slope_mb_per_min",
                "dropped_newest_wins", "out_fps", "in_fps"):
        assert key in r
    assert r["overloaded"] is True
    assert r["dropped_newest_wins"] > 0
    assert 0 < r["out_fps"] < r["in_fps"]
    series = r["run"]["process"]["rss_series_s_mb"]   # the RSS time series of the soak
    assert len(series) >= 3 and all(b > 0 for _, b in series)
    assert [t for t, _ in series] == sorted(t for t, _ in series)


def test_bench_compare(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"stage": "rectify", "stage_ms": 4.0, "floor_ms": 2.0}))
    b.write_text(json.dumps({"stage": "rectify", "stage_ms": 6.0, "floor_ms": 2.0}))
    c = bench("--compare", str(a), str(b), timeout=60)
    assert c["ratios"]["stage_ms"]["b_over_a"] == pytest.approx(1.5)
    assert c["ratios"]["floor_ms"]["b_over_a"] == pytest.approx(1.0)


@pytest.mark.parametrize("values_ms", [[1.0], [0.2, 5.0, 3.3, 12.0, 7.7], list(range(1, 101)),
                                       [0.01] * 50 + [900.0] * 50])
def test_latency_histogram_matches_exact_percentiles(values_ms):
    """The soak's fixed-memory latency summary equals numpy's percentiles to its 0.05 ms bin."""
    import numpy as np

    from perception2d_ros.bench.common import LatencyHistogram

    h = LatencyHistogram()
    for v in values_ms:
        h.add(v / 1e3)
    s = h.summary_ms()
    arr = np.asarray(values_ms)
    for q in (50, 95):
        exact = np.percentile(arr, q, method="inverted_cdf")
        assert abs(s[f"p{q}"] - exact) <= 0.05 + 1e-9, (q, s, exact)
    assert s["max"] == pytest.approx(max(values_ms))
    assert LatencyHistogram().summary_ms() == {"p50": 0.0, "p95": 0.0, "max": 0.0}


def test_replay_bookkeeping_is_bounded_for_unanswered_frames():
    """Frames dropped by newest-wins never answer: the harness forgets them after 10 s, so a
    soak's RSS measures the nodes, not the harness (it grew ~300 bytes a frame before)."""
    from perception2d_ros.bench.replay import _Graph

    g = _Graph.__new__(_Graph)          # bookkeeping only: no nodes, no DDS
    import threading
    g.lock = threading.Lock()
    g.in_flight = {}
    g.reset_counts()
    t0 = 1_000_000_000_000
    for i in range(20_000):             # 11 minutes at 30 Hz, nothing answered
        g.sent(t0 + i * 33_333_333, i)
    assert g.n_sent == 20_000
    assert len(g.in_flight) <= 64 + 301  # at most 10 s of frames (+ the pruning slack)
