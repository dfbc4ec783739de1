"""Replay frames over real DDS through the real nodes, at fixed rates and flat out.

Everything runs in this one process: a player thread publishes ``/bench/image_raw`` +
``/bench/camera_info`` (best effort, as a camera driver does), the nodes are the real
``PerceptionNode`` lifecycle nodes spun by their own executor (single-threaded,
``perception_node.make_executor``), and a collector node
subscribes to the outputs. Frames come from a bag (``--bag``: its first Image topic and the
CameraInfo topic next to it) or, without one, from the real COCO test images resized to
``--size`` with the real ``camerav1`` calibration.

Each published frame is re-stamped with the wall clock at publish time, so latency is
``input header.stamp → output received by the collector`` (transport, deserialisation and
executor scheduling included). Per stage:

* ``rectify``: ``camera_info_rect`` (published right after ``image_rect``, same stamp; the
  collector does not subscribe to the 2.7 MB image so it does not load the CPU it measures);
* ``detect``: ``detections`` (end to end).

Rates: a number = open loop at that rate (frames the node cannot take are dropped by its
newest-wins slot and counted); ``max`` = closed loop, the player sends the next frame as soon
as fewer than W frames are in flight (W = number of nodes in the chain), which measures the
maximum sustainable throughput without drops.

Overload / soak (:func:`run_overload`): one open-loop rate for a long time into a stage
slower than the input (e.g. detect at 1080p, or ``slow_ms`` added to the last stage by the
harness); reports latency p95 against the stage time, RSS slope (MB/min, least squares) and
drops.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Sequence

from perception2d_ros.bench.common import (LatencyHistogram, ProcessSampler, camera_info_fields, machine_info,
                     real_frames, ros_env_defaults, set_threads)

NS = "/bench"


# --------------------------------------------------------------------------- inputs
def load_frames(bag: str | None, size: tuple[int, int], limit: int = 30) -> tuple[list[Any], Any,
                                                                                   str]:
    """(Image messages, CameraInfo message, description) to replay."""
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import CameraInfo, Image
    from std_msgs.msg import Header

    from perception2d_ros.ros import conversions as conv

    if bag is None:
        imgs = real_frames(size, min(limit, 8))
        hdr = Header(frame_id="camera_optical")
        msgs = [conv.array_to_image_msg(i, "bgr8", hdr) for i in imgs]
        info = conv.camera_info_msg(camera_info_fields(size), hdr)
        return msgs, info, (f"{len(msgs)} real COCO test images resized to {size[0]}x{size[1]}, "
                            "calibration camerav1_1280x720.yaml")
    from perception2d_ros.io.bag_reader import BagReader

    if not Path(bag).exists():
        raise FileNotFoundError(f"bag {bag} does not exist")
    with BagReader(bag) as reader:
        topics = reader.topics
        images = sorted(t for t, m in topics.items() if m.msgtype == "sensor_msgs/msg/Image")
        infos = sorted(t for t, m in topics.items() if m.msgtype == "sensor_msgs/msg/CameraInfo")
        if not images:
            raise ValueError(f"{bag} has no sensor_msgs/msg/Image topic (has {sorted(topics)})")
        img_topic = next((t for t in images if t.endswith("image_raw")), images[0])
        ns = img_topic.rsplit("/", 1)[0]
        info_topic = next((t for t in infos if t == f"{ns}/camera_info"), infos[0] if infos
                          else None)
        if info_topic is None:
            raise ValueError(f"{bag} has no sensor_msgs/msg/CameraInfo topic; rectification "
                             "needs the calibration")
        msgs, info = [], None
        for m in reader.messages([img_topic, info_topic]):
            if m.topic == info_topic and info is None:
                info = deserialize_message(m.rawdata, CameraInfo)
            elif m.topic == img_topic and len(msgs) < limit:
                msgs.append(deserialize_message(m.rawdata, Image))
            if info is not None and len(msgs) >= limit:
                break
    if not msgs or info is None:
        raise ValueError(f"{bag}: no image/camera_info pair found on {img_topic}/{info_topic}")
    return msgs, info, f"{bag}: {img_topic} ({len(msgs)} frames, looped), {info_topic}"


# --------------------------------------------------------------------------- the graph
class _Graph:
    """Player + nodes + collector in one rclpy context."""

    def __init__(self, mode: str, threads: int | None, backend: str, model: str,
                 models_dir: str | None, slow_ms: float = 0.0, reliable: bool = False) -> None:
        import rclpy
        from rclpy.context import Context
        from rclpy.parameter import Parameter
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, Image
        from vision_msgs.msg import Detection2DArray

        from perception2d_ros.ros.perception_node import PerceptionNode, make_executor
        from perception2d_ros.ros.qos import RESULTS

        if mode not in ("pipeline", "nodes"):
            raise ValueError(f"--mode must be pipeline or nodes; got {mode!r}")
        self.mode = mode
        self.ctx = Context()
        rclpy.init(args=[], context=self.ctx)
        self.executor = make_executor(self.ctx)  # the nodes' own executor (run_nodes)
        params: dict[str, Any] = {"detect.backend": backend, "detect.model": model,
                                  "diagnostics_period_s": 3600.0}
        if reliable:
            params["image_reliability"] = "reliable"
        if threads:
            params["detect.threads"] = int(threads)
        if models_dir:
            params["models_dir"] = models_dir
        over = [Parameter(k, value=v) for k, v in params.items()]
        kinds = ["pipeline_node"] if mode == "pipeline" else ["rectify_node", "detector_node"]
        self.nodes = []
        for kind in kinds:
            node = PerceptionNode(kind, node_name=f"bench_{kind}", context=self.ctx,
                                  namespace=NS, parameter_overrides=over)
            if node.pipeline is None:
                raise RuntimeError(f"{kind} failed to configure (see the log above)")
            self.nodes.append(node)
        self.slow_ms = float(slow_ms)
        if self.slow_ms > 0:
            self._make_slow(self.nodes[-1], self.slow_ms)
        self.driver = rclpy.create_node("bench_player", context=self.ctx, namespace=NS)
        qos = QoSProfile(depth=2, history=HistoryPolicy.KEEP_LAST,
                         reliability=ReliabilityPolicy.RELIABLE if reliable
                         else ReliabilityPolicy.BEST_EFFORT)
        self.pub_img = self.driver.create_publisher(Image, "image_raw", qos)
        self.pub_info = self.driver.create_publisher(CameraInfo, "camera_info", qos)
        self.lock = threading.Lock()
        # fixed memory per run (a soak's RSS slope must not measure the harness): stamps in
        # flight only (pruned when the last output arrives or after FORGET_NS), counters and
        # latency histograms
        self.in_flight: dict[int, int] = {}
        self.n_sent = 0
        self.out: dict[str, LatencyHistogram] = {}
        self.reset_counts()
        self.new_output = threading.Condition(self.lock)
        self.driver.create_subscription(CameraInfo, "camera_info_rect",
                                        lambda m: self._on_out("rectify", m), qos)
        self.driver.create_subscription(Detection2DArray, "detections",
                                        lambda m: self._on_out("detect", m), RESULTS)
        for n in self.nodes + [self.driver]:
            self.executor.add_node(n)
        self._spin = threading.Thread(target=self._spin_fn, name="bench-executor", daemon=True)
        self._spin.start()
        self._wait_matched()

    @staticmethod
    def _make_slow(node: Any, slow_ms: float) -> None:
        """Harness-side artificial slowness: the node's last stage sleeps ``slow_ms`` more."""
        stage = node.pipeline.stages[-1]
        inner = stage.process

        def slow_process(frame: Any) -> None:
            inner(frame)
            time.sleep(slow_ms / 1e3)
        stage.process = slow_process

    def _spin_fn(self) -> None:
        try:
            self.executor.spin()
        except Exception:  # executor shut down while spinning
            pass

    def _wait_matched(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        need = {"image_raw": 1, "camera_info": 1}
        while time.monotonic() < deadline:
            ok = (self.pub_img.get_subscription_count() >= need["image_raw"]
                  and self.pub_info.get_subscription_count() >= need["camera_info"]
                  and self.driver.count_publishers(f"{NS}/detections") >= 1
                  and self.driver.count_publishers(f"{NS}/camera_info_rect") >= 1)
            if ok and (self.mode == "pipeline" or
                       self.driver.count_subscribers(f"{NS}/image_rect") >= 1):
                time.sleep(0.5)  # let the reverse direction of discovery settle too
                return
            time.sleep(0.02)
        raise TimeoutError("bench graph: DDS discovery did not complete within "
                           f"{timeout:g} s (check ROS_DOMAIN_ID / FASTDDS profile)")

    FORGET_NS = 10_000_000_000  # a frame without its last output after 10 s is lost

    def reset_counts(self) -> None:
        """Start a run: nothing in flight, no outputs (call with the lock held or idle)."""
        self.in_flight.clear()
        self.n_sent = 0
        self.out = {"rectify": LatencyHistogram(), "detect": LatencyHistogram()}

    def sent(self, ns: int, i: int) -> None:
        with self.lock:
            self.in_flight[ns] = i
            self.n_sent += 1
            if len(self.in_flight) > 64:  # frames dropped by newest-wins never answer
                old = ns - self.FORGET_NS
                for k in [k for k in self.in_flight if k < old]:
                    del self.in_flight[k]

    def _on_out(self, stage: str, msg: Any) -> None:
        now = time.time_ns()
        ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        with self.lock:
            if ns in self.in_flight:  # ignore late outputs of an earlier run
                self.out[stage].add((now - ns) / 1e9)
                if stage == "detect":  # the chain's last output: the frame is done
                    del self.in_flight[ns]
                self.new_output.notify_all()

    def dropped(self) -> dict[str, int]:
        return {n.get_name(): int(n.diagnostics().get("dropped_newest_wins", "0"))
                for n in self.nodes}

    def node_stats(self) -> dict[str, dict[str, str]]:
        keep = ("_ms_p50", "_ms_p95")
        return {n.get_name(): {k: v for k, v in n.diagnostics().items()
                               if k.endswith(keep) or k.startswith(("frames", "dropped",
                                                                      "errors", "unmatched"))}
                for n in self.nodes}

    def stage_time_ms(self, pct: str = "p50") -> float:
        """p50 (or p95) of the node's pipeline time (the slowest node in nodes mode), ms."""
        vals = []
        for n in self.nodes:
            v = n.diagnostics().get(f"total_ms_{pct}")
            if v is not None:
                vals.append(float(v))
        return max(vals) if vals else 0.0

    def close(self) -> None:
        import rclpy

        self.executor.shutdown(timeout_sec=2.0)
        for n in list(self.executor.get_nodes()):
            n.destroy_node()
        rclpy.try_shutdown(context=self.ctx)
        self._spin.join(timeout=5.0)


def _stamp(msg: Any, ns: int) -> None:
    msg.header.stamp.sec = ns // 1_000_000_000
    msg.header.stamp.nanosec = ns % 1_000_000_000


# --------------------------------------------------------------------------- one run
def _play(g: _Graph, msgs: Sequence[Any], info: Any, rate: float | None, duration: float,
          window: int, warmup_s: float | None = None) -> dict[str, Any]:
    """Publish for ``duration`` s at ``rate`` Hz (None: closed loop with ``window`` frames in
    flight); returns the per-run statistics."""
    with g.lock:
        g.reset_counts()
    # refresh the nodes' "camera_info seen" clock after an idle gap (else the first image of
    # a run can be reported as missing its calibration when its info is handled second)
    _stamp(info, time.time_ns())
    g.pub_info.publish(info)
    time.sleep(0.05)
    drop0 = g.dropped()
    sampler = ProcessSampler(period=max(0.25, min(5.0, duration / 200.0)))
    t_start = time.monotonic()
    i = 0
    stalled = 0  # closed loop: frames given up on after 1 s without any output
    with sampler:
        while True:
            now = time.monotonic()
            if now - t_start >= duration:
                break
            if rate is not None:
                due = t_start + i / rate
                if due > now:
                    time.sleep(min(due - now, 0.05))
                    continue
                if now - due > 1.0 / rate:  # player fell behind: skip, never burst
                    i = int((now - t_start) * rate)
            else:
                with g.lock:
                    if g.n_sent - g.out["detect"].count - stalled >= window:
                        if not g.new_output.wait(timeout=1.0):
                            stalled += 1
                        continue
            msg = msgs[i % len(msgs)]
            ns = time.time_ns()
            _stamp(msg, ns)
            _stamp(info, ns)
            g.sent(ns, i)
            g.pub_info.publish(info)
            g.pub_img.publish(msg)
            i += 1
        end = time.monotonic() + 2.0  # let the frames in flight arrive
        while time.monotonic() < end:
            with g.lock:
                if g.out["detect"].count >= g.n_sent:
                    break
            time.sleep(0.02)
    wall = time.monotonic() - t_start
    drop1 = g.dropped()
    with g.lock:
        n_in = g.n_sent
        per_stage = {stage: {"out_fps": round(h.count / duration, 2), "frames_out": h.count,
                             "latency_ms": h.summary_ms()} for stage, h in g.out.items()}
    drops = {k: drop1[k] - drop0.get(k, 0) for k in drop1}
    final = per_stage["detect"]["frames_out"]
    return {"rate": "max" if rate is None else rate, "duration_s": round(wall, 2),
            "in_fps": round(n_in / duration, 2), "frames_in": n_in,
            "stages": per_stage, "end_to_end": per_stage["detect"],
            "dropped_newest_wins": drops, "dropped_total": sum(drops.values()),
            "lost_other": max(0, n_in - final - sum(drops.values())),
            "process": sampler.result(skip_s=min(10.0, duration * 0.2) if warmup_s is None
                                      else warmup_s),
            "node_stats": g.node_stats()}


def _sustainable(runs: list[dict[str, Any]]) -> float:
    best = 0.0
    for r in runs:
        out = r["end_to_end"]["out_fps"]
        if r["rate"] == "max":
            best = max(best, out)
        elif r["frames_in"] and r["dropped_total"] + r["lost_other"] <= 0.01 * r["frames_in"] \
                and out >= 0.95 * r["in_fps"]:
            best = max(best, out)
    return round(best, 2)


def _parse_rates(rates: Sequence[str] | str) -> list[float | None]:
    if isinstance(rates, str):
        rates = [r for r in rates.split(",") if r.strip()]
    out: list[float | None] = []
    for r in rates:
        r = str(r).strip().lower()
        if r in ("max", "flat", "inf"):
            out.append(None)
        else:
            v = float(r)
            if not v > 0:
                raise ValueError(f"--rates: {r} must be > 0 or 'max'")
            out.append(v)
    if not out:
        raise ValueError("--rates: give at least one rate (e.g. 10,30,60,max)")
    return out


def run_rates(*, bag: str | None, rates: Sequence[str] | str, mode: str = "pipeline",
              duration: float = 10.0, size: tuple[int, int] = (1280, 720),
              threads: int | None = None, backend: str = "auto", model: str = "yolox_nano",
              models_dir: str | None = None, slow_ms: float = 0.0,
              warmup_s: float = 2.0) -> dict[str, Any]:
    """Replay at each rate (see module docstring); returns the JSON-able result."""
    ros_env_defaults()
    n_threads = set_threads(threads)
    parsed = _parse_rates(rates)
    msgs, info, source = load_frames(bag, size)
    g = _Graph(mode, threads, backend, model, models_dir, slow_ms=slow_ms)
    try:
        window = len(g.nodes)
        _play(g, msgs, info, None, warmup_s, window)  # warm-up: models, caches, discovery
        runs = [_play(g, msgs, info, r, duration, window) for r in parsed]
        det = None
        for n in g.nodes:
            for s in n.pipeline.stages:
                if s.name == "detect":
                    det = s.detector
    finally:
        g.close()
    return {"bench": "replay", "mode": mode,
            "chain": "pipeline_node" if mode == "pipeline" else "rectify_node -> detector_node",
            "source": source, "size": f"{msgs[0].width}x{msgs[0].height}",
            "encoding": msgs[0].encoding, "duration_s_per_rate": duration,
            "max_sustainable_fps": _sustainable(runs),
            "latency_measures": "input header.stamp (wall clock at publish) -> output received "
                                "by a subscriber in the same process, over Fast DDS",
            "max_rate_means": f"closed loop, next frame when < {window} in flight",
            "slow_ms_added": slow_ms or 0.0,
            "backend": f"{det.engine.backend}({det.engine.device})" if det else "?",
            "model": getattr(det, "model_name", model) if det else model,
            "threads": {"opencv": n_threads, "requested": threads or "default"},
            "runs": runs, "machine": machine_info()}


def run_overload(*, bag: str | None, rate: float = 30.0, duration: float = 600.0,
                 mode: str = "pipeline", size: tuple[int, int] = (1920, 1080),
                 threads: int | None = None, backend: str = "auto",
                 model: str = "yolox_nano", models_dir: str | None = None,
                 slow_ms: float = 0.0, warmup_s: float | None = None) -> dict[str, Any]:
    """Feed ``rate`` Hz for ``duration`` s into a stage slower than that; see module doc.

    ``warmup_s`` (default min(300 s, a fifth of the run)): the first seconds left out of the
    RSS slope. glibc's malloc raises its mmap threshold after the first large frees, so
    frame-sized buffers move from mmap into the heap and RSS climbs to a plateau over the
    first minutes (~2,000 frames at 1080p); the slope after that is the one that would
    grow without bound. The whole RSS series is in the result either way."""
    if warmup_s is None:
        warmup_s = min(300.0, duration * 0.2)
    ros_env_defaults()
    n_threads = set_threads(threads)
    msgs, info, source = load_frames(bag, size)
    g = _Graph(mode, threads, backend, model, models_dir, slow_ms=slow_ms)
    try:
        _play(g, msgs, info, None, 2.0, len(g.nodes))
        run = _play(g, msgs, info, float(rate), duration, len(g.nodes), warmup_s=warmup_s)
        stage_ms = g.stage_time_ms()
        stage_p95 = g.stage_time_ms("p95")
    finally:
        g.close()
    e2e = run["end_to_end"]
    p95 = e2e["latency_ms"]["p95"]
    period_ms = 1e3 / rate
    return {"bench": "overload", "mode": mode, "source": source,
            "size": f"{msgs[0].width}x{msgs[0].height}", "rate_hz": rate,
            "input_period_ms": round(period_ms, 2), "duration_s": duration,
            "slow_ms_added": slow_ms or 0.0,
            "stage_ms_p50": stage_ms, "stage_ms_p95": stage_p95,
            "stage_measures": "the node's pipeline time (frame.timings total; last 200 frames)",
            "overloaded": stage_ms > period_ms,
            "latency_p95_ms": p95, "latency_p50_ms": e2e["latency_ms"]["p50"],
            "latency_max_ms": e2e["latency_ms"]["max"],
            "latency_p95_over_stage": round(p95 / stage_ms, 2) if stage_ms else None,
            "latency_expectation": "newest-wins keeps latency bounded: a frame waits at most "
                                   "one stage time in the slot, then its own stage time "
                                   "(+ transport), so p95 should stay near 1-2x the stage time "
                                   "and not grow with the run length",
            "out_fps": e2e["out_fps"], "in_fps": run["in_fps"],
            "dropped_newest_wins": run["dropped_total"],
            "drop_fraction": round(run["dropped_total"] / max(1, run["frames_in"]), 3),
            "lost_other": run["lost_other"],
            "rss_slope_mb_per_min": run["process"]["rss_slope_mb_per_min"],
            "rss_slope_after_s": warmup_s,
            "rss_mb_start": run["process"]["rss_mb_start"],
            "rss_mb_end": run["process"]["rss_mb_end"],
            "cpu_percent_of_one_core": run["process"]["cpu_percent_of_one_core"],
            "gpu_memory_mb": run["process"]["gpu_memory_mb"],
            "threads": {"opencv": n_threads, "requested": threads or "default"},
            "run": run, "machine": machine_info()}
