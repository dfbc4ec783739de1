"""The ``--dds`` part of the stage benchmark: the same node spun by an executor and fed over
real DDS in one process (lockstep), and one image hop between two processes (``hop-echo``
child: ``python -m perception2d_ros.bench.dds hop-echo``).
"""
from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from perception2d_ros.bench.common import (LAST_TOPIC, NODE_FOR, input_messages, make_node,
                                           ros_env_defaults, set_stamp, summarize_ms)


def run_dds_lockstep(stage: str, *, frames: int, size: tuple[int, int], threads: int | None,
                     backend: str, model: str, models_dir: str | None, warmup: int,
                     in_node_ms: float | None = None) -> dict[str, Any]:
    """The same node spun by an executor, fed over real DDS by a publisher in this process;
    a subscriber in this process receives the last output. Time = publish() call of the input
    → output received in the subscriber callback (transport both ways, rclpy (de)serialise
    both ways, executor scheduling included)."""
    import rclpy
    from rclpy.context import Context
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image

    from perception2d_ros.ros.perception_node import make_executor

    ctx = Context()
    rclpy.init(args=[], context=ctx)
    executor = make_executor(ctx)  # the nodes' own executor (run_nodes)
    spin = None
    try:
        node = make_node(stage, ctx, threads, backend, model, models_dir)
        drv = rclpy.create_node("bench_driver", context=ctx, namespace="/bench")
        executor.add_node(node)
        executor.add_node(drv)
        spin = threading.Thread(target=executor.spin, daemon=True)
        spin.start()
        msgs, info, _ = input_messages(stage, size, min(8, max(frames, 1)))
        qos = QoSProfile(depth=2, history=HistoryPolicy.KEEP_LAST,
                         reliability=ReliabilityPolicy.BEST_EFFORT)
        raw_input = NODE_FOR[stage] != "detector_node"
        img_topic = "image_raw" if raw_input else "image_rect"
        info_topic = "camera_info" if raw_input else "camera_info_rect"
        pub_img = drv.create_publisher(Image, img_topic, qos)
        pub_info = drv.create_publisher(CameraInfo, info_topic, qos)
        out_topic = LAST_TOPIC[stage]
        got = threading.Event()
        recv: dict[int, float] = {}

        def on_out(msg: Any) -> None:
            ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
            recv[ns] = time.perf_counter()
            got.set()

        if out_topic == "detections":
            from vision_msgs.msg import Detection2DArray

            from perception2d_ros.ros.qos import RESULTS
            drv.create_subscription(Detection2DArray, out_topic, on_out, RESULTS)
        else:
            drv.create_subscription(CameraInfo, out_topic, on_out, qos)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and (
                pub_img.get_subscription_count() < 1 or
                drv.count_publishers(out_topic) < 1):
            time.sleep(0.01)
        time.sleep(0.3)  # let the reverse matching settle
        lat, lost = [], 0
        stamp0 = time.time_ns()
        for i in range(warmup + frames):
            msg = msgs[i % len(msgs)]
            ns = stamp0 + i * 33_000_000
            set_stamp(msg, ns)
            set_stamp(info, ns)
            got.clear()
            pub_info.publish(info)
            t0 = time.perf_counter()
            pub_img.publish(msg)
            if not _wait_key(recv, ns, got, 10.0, 0.5):
                lost += 1
                continue
            if i >= warmup:
                lat.append(recv[ns] - t0)
        s = summarize_ms(lat)
        out = {"measures": "input publish() call -> last output received by a subscriber in "
                           "the same process (Fast DDS intra-process delivery; see 'hop' for "
                           "the transport between processes), executor-driven node",
               "p50_ms": s["p50"], "p95_ms": s["p95"], "max_ms": s["max"], "lost": lost,
               "executor": type(executor).__name__}
        if in_node_ms is not None:
            out["transport_share_ms_p50"] = round(s["p50"] - in_node_ms, 3)
            out["transport_share_note"] = ("dds p50 minus the in-node stage p50 of the same "
                                           "run: input serialise + transport + deserialise, "
                                           "output transport + deserialise, executor wake-ups")
        return out
    finally:
        _shutdown(executor, ctx, spin)


def _wait_key(store: dict, key: Any, event: threading.Event, timeout: float,
              poll: float) -> bool:
    """Wait until ``key`` is in ``store`` (set by a subscription callback that sets ``event``)."""
    end = time.monotonic() + timeout
    while key not in store and time.monotonic() < end:
        event.wait(poll)
        event.clear()
    return key in store


def _shutdown(executor: Any, ctx: Any, spin: threading.Thread | None) -> None:
    import rclpy

    executor.shutdown(timeout_sec=2.0)
    for n in list(executor.get_nodes()):
        n.destroy_node()
    rclpy.try_shutdown(context=ctx)
    if spin is not None:
        spin.join(timeout=5.0)


# ------------------------------------------------------------------ one hop, two processes
HOP_TOPICS = {"best_effort": "hop/image_be", "reliable": "hop/image_rel"}


def run_dds_hop(*, size: tuple[int, int] = (1280, 720), frames: int = 20, warmup: int = 5,
                timeout: float = 20.0) -> dict[str, Any]:
    """One bgr8 Image hop between two processes, as between ``rectify_node`` and
    ``detector_node`` launched separately: this process publishes with the nodes' image QoS
    (``IMAGES_OUT``: reliable, keep last 5) to a child process whose subscriptions use the
    nodes' input QoS (keep last 2; best effort — the default ``image_reliability`` — and
    reliable), spun by the nodes' executor; the child acknowledges each image with a small
    message (``RESULTS`` QoS) carrying its receive time. Unlike the lockstep above (one
    process: Fast DDS delivers intra-process), this path goes through the transport of the
    Fast DDS profile in use (SHM for images with ``config/fastdds_localhost_shm.xml``).

    ``image_hop_ms``: input ``publish()`` call → child subscription callback (CLOCK_MONOTONIC
    is shared by both processes); ``round_trip_ms``: → acknowledgement received here."""
    import os
    import subprocess
    import sys

    import rclpy
    from rclpy.context import Context
    from sensor_msgs.msg import CameraInfo, Image

    from perception2d_ros.ros.perception_node import make_executor
    from perception2d_ros.ros.qos import IMAGES_OUT, RESULTS

    w, h = size
    img = Image(height=h, width=w, encoding="bgr8", step=w * 3)
    img.data = np.random.default_rng(0).integers(0, 255, h * w * 3, dtype=np.uint8).tobytes()
    child = subprocess.Popen([sys.executable, "-m", "perception2d_ros.bench.dds", "hop-echo"],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=dict(os.environ))
    ctx = Context()
    rclpy.init(args=[], context=ctx)
    executor = make_executor(ctx)
    spin = None
    try:
        drv = rclpy.create_node("bench_hop_driver", context=ctx, namespace="/bench")
        executor.add_node(drv)
        acks: dict[int, tuple[float, int]] = {}
        got = threading.Event()

        def on_ack(msg: Any) -> None:
            ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
            acks[ns] = (time.perf_counter(), int(msg.header.frame_id))
            got.set()

        drv.create_subscription(CameraInfo, "hop/ack", on_ack, RESULTS)
        pubs = {k: drv.create_publisher(Image, t, IMAGES_OUT) for k, t in HOP_TOPICS.items()}
        spin = threading.Thread(target=executor.spin, daemon=True)
        spin.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (
                any(p.get_subscription_count() < 1 for p in pubs.values()) or
                drv.count_publishers("hop/ack") < 1):
            if child.poll() is not None:
                raise RuntimeError("hop echo process exited: "
                                   + child.stderr.read().decode(errors="replace")[-2000:])
            time.sleep(0.01)
        if any(p.get_subscription_count() < 1 for p in pubs.values()):
            raise TimeoutError(f"hop: the echo process was not discovered within {timeout:g} s")
        time.sleep(0.3)  # let the reverse matching settle
        out: dict[str, Any] = {
            "measures": "one Image hop between two processes: publish() with the nodes' "
                        "image QoS -> subscription callback in the other process "
                        "(image_hop_ms); + a small ack back (round_trip_ms)",
            "size": f"{w}x{h}", "encoding": "bgr8", "bytes": len(img.data),
            "fastdds_profile": os.path.basename(os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE",
                                                               "") or "(Fast DDS defaults)"),
            "executor": type(executor).__name__}
        stamp0 = time.time_ns()
        i = 0
        for name, pub in pubs.items():
            hop, rtt, lost = [], [], 0
            for k in range(warmup + frames):
                i += 1
                ns = stamp0 + i * 33_000_000
                set_stamp(img, ns)
                got.clear()
                t_mono = time.monotonic_ns()
                t0 = time.perf_counter()
                pub.publish(img)
                if not _wait_key(acks, ns, got, 2.0, 0.2):
                    lost += 1
                    continue
                if k >= warmup:
                    t_ack, t_child = acks[ns]
                    hop.append((t_child - t_mono) * 1e-9)
                    rtt.append(t_ack - t0)
            sh, sr = summarize_ms(hop), summarize_ms(rtt)
            out[name] = {"image_hop_ms_p50": sh["p50"], "image_hop_ms_p95": sh["p95"],
                         "image_hop_ms_max": sh["max"], "round_trip_ms_p50": sr["p50"],
                         "round_trip_ms_p95": sr["p95"], "frames": frames, "lost": lost}
        return out
    finally:
        try:
            child.stdin.close()  # the echo exits on EOF
            child.wait(timeout=10)
        except Exception:
            child.kill()
            child.wait()
        _shutdown(executor, ctx, spin)


def _hop_echo() -> None:
    """Child of :func:`run_dds_hop`: acknowledge every image with its receive time, until
    stdin closes."""
    import os
    import sys

    import rclpy
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image

    from perception2d_ros.ros.perception_node import make_executor
    from perception2d_ros.ros.qos import RESULTS

    rclpy.init(args=[])
    node = rclpy.create_node("bench_hop_echo", namespace="/bench")
    ack_pub = node.create_publisher(CameraInfo, "hop/ack", RESULTS)

    def on_image(msg: Any) -> None:
        t = time.monotonic_ns()
        ack = CameraInfo()
        ack.header.stamp = msg.header.stamp
        ack.header.frame_id = str(t)
        ack_pub.publish(ack)

    for name, topic in HOP_TOPICS.items():
        # the nodes' image input QoS (perception_node: depth 2, image_reliability)
        qos = QoSProfile(depth=2, history=HistoryPolicy.KEEP_LAST,
                         reliability=ReliabilityPolicy.RELIABLE if name == "reliable"
                         else ReliabilityPolicy.BEST_EFFORT)
        node.create_subscription(Image, topic, on_image, qos)
    executor = make_executor()
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()
    sys.stdin.read()  # EOF: the driver is done
    os._exit(0)  # no DDS teardown wait: the driver already has its numbers


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["hop-echo"]:
        ros_env_defaults()
        _hop_echo()
    else:
        sys.exit("usage: python -m perception2d_ros.bench.dds hop-echo  (bench helper)")
