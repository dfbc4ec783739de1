"""DDS hop latency: the executor the nodes spin in, the Fast DDS profile, and the bench's
``--dds`` numbers for a 720p image.

Regression guard for the 130–260 ms per-hop latency of ``bench detect/rectify --dds``: rclpy's
``MultiThreadedExecutor`` re-submitted not-yet-started callback tasks thousands of times, and
the real callbacks waited behind those no-ops (docs/BENCHMARKS.md, "DDS hop latency"). The
checks below are a configuration check, a deterministic dispatch count (no timing), and one
generous timed bound (p50 < 50 ms where ~4–7 ms is measured, 20 ms on a loaded 2-core box).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="needs rclpy (installed by `make test`)")

pytestmark = pytest.mark.ros

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "config" / "fastdds_localhost_shm.xml"
NS = "{http://www.eprosima.com}"
# a 1920x1080 bgr8 sensor_msgs/Image as CDR: the pixels plus a header of well under 1 KiB
IMAGE_1080P_BYTES = 1920 * 1080 * 3 + 1024


def test_nodes_spin_in_a_single_threaded_executor(monkeypatch):
    import rclpy
    from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor

    from perception2d_ros.ros import perception_node as pn

    from rclpy.context import Context

    ctx = Context()
    rclpy.init(args=[], context=ctx)
    try:
        ex = pn.make_executor(ctx)
        assert isinstance(ex, SingleThreadedExecutor)
        assert not isinstance(ex, MultiThreadedExecutor)
        ex.shutdown()
    finally:
        rclpy.try_shutdown(context=ctx)

    # run_nodes (every node entry point) spins the executor of make_executor
    used: list[object] = []

    class FakeExecutor:
        def add_node(self, node):
            used.append(node)

        def spin(self):
            raise KeyboardInterrupt

    class FakeNode:
        context = None
        destroyed = False

        def destroy_node(self):
            self.destroyed = True

    monkeypatch.setattr(pn, "make_executor", lambda context=None: FakeExecutor())
    monkeypatch.setattr(rclpy, "try_shutdown", lambda *a, **k: None)
    node = FakeNode()
    pn.run_nodes([node])
    assert used == [node] and node.destroyed


def _dispatches_per_message(executor_factory, n: int = 20) -> float:
    """Lockstep ping → echo → pong through ``executor_factory(ctx)`` in one context; returns
    how many callbacks the executor handed out per message (wait_for_ready_callbacks
    results). A callback that is dispatched more than once shows up as > 1."""
    import rclpy
    from rclpy.context import Context
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from std_msgs.msg import Header

    ctx = Context()
    rclpy.init(args=[], context=ctx)
    executor = executor_factory(ctx)
    calls = [0]
    inner = executor.wait_for_ready_callbacks

    def counting(*args, **kwargs):
        out = inner(*args, **kwargs)
        calls[0] += 1
        return out

    executor.wait_for_ready_callbacks = counting
    spin = None
    try:
        qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        echo = rclpy.create_node("hop_echo", context=ctx, namespace="/test_dispatch")
        pong = echo.create_publisher(Header, "pong", qos)
        echo.create_subscription(Header, "ping", pong.publish, qos)
        drv = rclpy.create_node("hop_driver", context=ctx, namespace="/test_dispatch")
        ping = drv.create_publisher(Header, "ping", qos)
        got = threading.Semaphore(0)
        drv.create_subscription(Header, "pong", lambda m: got.release(), qos)
        executor.add_node(echo)
        executor.add_node(drv)
        spin = threading.Thread(target=executor.spin, daemon=True)
        spin.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (ping.get_subscription_count() < 1
                                               or pong.get_subscription_count() < 1):
            time.sleep(0.01)
        time.sleep(0.3)
        for i in range(3):  # warm-up
            ping.publish(Header(frame_id=str(i)))
            assert got.acquire(timeout=5)
        calls[0] = 0
        for i in range(n):
            ping.publish(Header(frame_id=str(i)))
            assert got.acquire(timeout=5), f"message {i} lost"
        time.sleep(0.05)
        return calls[0] / n
    finally:
        from perception2d_ros.bench.dds import _shutdown

        _shutdown(executor, ctx, spin)


def test_executor_dispatches_each_callback_once():
    """Two callbacks per message (echo + driver), each dispatched once: exactly 2.0 with the
    single-threaded executor. MultiThreadedExecutor (rclpy 9.1) hands a not-yet-started task
    out again until a pool thread picks it up: 4.9–7.3 per message here with these small
    messages, 20–150 with 720p images on a busy machine."""
    from perception2d_ros.ros.perception_node import make_executor

    per_msg = _dispatches_per_message(make_executor)
    assert per_msg <= 2.5, f"{per_msg:.2f} executor dispatches per message (2 expected)"


def test_fastdds_profile_fits_images():
    """The SHM transport must take a whole image: Fast DDS falls back to 64 KB fragments
    otherwise (best-effort images lost between processes; reliable ones 16–30 ms per hop
    through repair round trips)."""
    root = ET.parse(PROFILE).getroot()
    shm = [t for t in root.iter(f"{NS}transport_descriptor")
           if t.findtext(f"{NS}type") == "SHM"]
    assert len(shm) == 1
    segment = int(shm[0].findtext(f"{NS}segment_size"))
    max_msg = int(shm[0].findtext(f"{NS}maxMessageSize"))
    assert max_msg >= IMAGE_1080P_BYTES
    # the writer's history (keep last 5 images) and a second output image fit in the segment
    assert segment >= 6 * IMAGE_1080P_BYTES
    participants = list(root.iter(f"{NS}participant"))
    assert len(participants) == 1 and participants[0].get("is_default_profile") == "true"
    used = [e.text for e in participants[0].iter(f"{NS}transport_id")]
    assert shm[0].findtext(f"{NS}transport_id") in used
    assert participants[0].findtext(f"{NS}rtps/{NS}useBuiltinTransports") == "false"
    # UDP stays on loopback (sandbox rule)
    udp = [t for t in root.iter(f"{NS}transport_descriptor")
           if t.findtext(f"{NS}type") == "UDPv4"]
    assert [a.text for u in udp for a in u.iter(f"{NS}address")] == ["127.0.0.1"]
    # the tools load it: scripts/ros_env.sh and the bench defaults
    assert "config/fastdds_localhost_shm.xml" in (REPO / "scripts" / "ros_env.sh").read_text()
    from perception2d_ros.bench import common

    env = dict(os.environ)
    try:
        os.environ.pop("FASTDDS_DEFAULT_PROFILES_FILE", None)
        common.ros_env_defaults()
        assert Path(os.environ["FASTDDS_DEFAULT_PROFILES_FILE"]) == PROFILE
    finally:
        os.environ.clear()
        os.environ.update(env)


# A transport measurement: in a pytest process of its own (marker slow: scripts/run_tests.sh
# runs each slow file alone, after cleaning /dev/shm), as a user runs `bench --dds`. Here
# one best-effort frame in 20 was lost in 3 of ~25 runs, each time while other DDS
# processes were busy on the machine (the fast group's earlier tests in the same process, or
# a second test run); none in the runs without them (22 runs, 6 with both cores busy).
@pytest.mark.slow
def test_bench_dds_720p_hop_latency():
    """``bench rectify --dds``: the 720p lockstep through the real node (one process) and one
    image hop between two processes, both with the nodes' executor and QoS. Bound: p50 < 50 ms
    (measured 4–7 ms idle, ≤ 20 ms with both cores busy; the bug gave 130–260 ms)."""
    cmd = [sys.executable, "-m", "perception2d_ros.cli.main", "bench", "rectify", "--dds",
           "--frames", "20", "--warmup", "3", "--json"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    dds = json.loads(proc.stdout)["dds"]
    assert dds["executor"] == "SingleThreadedExecutor"
    assert dds["lost"] == 0
    assert dds["p50_ms"] < 50, dds
    hop = dds["hop"]
    assert hop["size"] == "1280x720" and hop["bytes"] == 1280 * 720 * 3
    assert hop["executor"] == "SingleThreadedExecutor"
    assert hop["fastdds_profile"] == PROFILE.name
    for reliability in ("best_effort", "reliable"):
        r = hop[reliability]
        assert r["lost"] == 0 and r["frames"] == 20, hop
        assert r["image_hop_ms_p50"] < 50, hop
