"""One stage, message-in → message-out, through a real in-process ``PerceptionNode``.

Stage time (``stage_ms``) starts the moment a ready ``sensor_msgs/Image`` is handed to the
node's subscription callback (``_on_image`` for raw input, with its camera_info already
delivered to the sync; ``_on_rect_image`` for rectified input) and stops when the
``publish()`` of the frame's last output message has returned. Included: approximate-time
sync, the newest-wins slot hand-off and worker-thread wake-up, Image → array conversion,
the camera-model cache lookup, the pipeline stages, output message construction and
``publish()`` (rclpy Python → C conversion, CDR serialisation, DDS write). Not included:
the input's DDS transport and rclpy deserialisation (≈ what a subscriber pays before the
callback runs) — ``--dds`` measures that path too and reports it separately.

The floor is the bare primitive on the same frames, measured in the same run, interleaved
frame by frame with the stage so both see the same machine load:

* rectify: ``cv2.remap`` with the node's own CV_16SC2 maps into a preallocated output;
* detect: ``engine.infer`` (the raw engine call of the node's own detector) on the same
  preprocessed tensor;
* pipeline: the sum of both.

Frames are real COCO test images resized to ``--size``; the calibration is the real
1280×720 ``camerav1`` one (scaled for other sizes). Frames are sent in lockstep (the next
one only after the previous frame's outputs were published), so nothing is dropped.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import numpy as np

from perception2d_ros.bench.common import (camera_info_fields, machine_info, ros_env_defaults, real_frames,
                     set_threads, summarize_ms)

STAGES = ("rectify", "detect", "pipeline", "sam", "clip", "lseg")
MODEL_STAGES = ("sam", "clip", "lseg")
NODE_FOR = {"rectify": "rectify_node", "detect": "detector_node", "pipeline": "pipeline_node"}
LAST_TOPIC = {"rectify": "camera_info_rect", "detect": "detections", "pipeline": "detections"}
FIRST_TOPIC = {"rectify": "image_rect", "detect": "detections", "pipeline": "image_rect"}

INCLUDED = ("approximate-time sync (raw input), newest-wins slot hand-off + worker wake-up, "
            "Image->array conversion, camera model cache, pipeline stages, output message "
            "construction, publish() (rclpy conversion + CDR serialisation + DDS write)")
EXCLUDED = ("input DDS transport + rclpy deserialisation of the input Image (use --dds); "
            "subscriber-side deserialisation of the outputs")


# --------------------------------------------------------------------------- helpers
class _TimedPublisher:
    """Wraps an rclpy publisher: calls ``sink(topic, msg, t_after_publish)``."""

    def __init__(self, pub: Any, topic: str, sink: Callable[[str, Any, float], None]) -> None:
        self._pub, self._topic, self._sink = pub, topic, sink

    def publish(self, msg: Any) -> None:
        self._pub.publish(msg)
        self._sink(self._topic, msg, time.perf_counter())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pub, name)


class _TimedRunner:
    """Wraps the node's FrameRunner to time conversion + pipeline + message construction."""

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        self.t_start = self.t_end = 0.0
        self.timings: dict[str, float] = {}

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Same arguments as ``FrameRunner.run``."""
        self.t_start = time.perf_counter()
        frame, msgs = self._runner.run(*args, **kwargs)
        self.t_end = time.perf_counter()
        # keep only the timings: holding the frame would keep its buffers alive (and
        # defeat the rectify stage's output reuse)
        self.timings = dict(frame.timings)
        return frame, msgs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)


def model_weights_status(stage: str, models_dir: str | None = None) -> tuple[bool, str]:
    """(present, reason) for the weights of an optional model stage (sam / clip / lseg)."""
    try:
        from perception2d_ros.engines import model_store

        entries = model_store.load_manifest(models_dir)
    except Exception as exc:  # manifest unreadable: say so instead of crashing the bench
        return False, f"model manifest unreadable: {exc}"
    kind = {"sam": "sam", "clip": "clip", "lseg": "lseg"}[stage]
    candidates = [e for e in entries.values() if e.kind == kind]
    if not candidates:
        return False, f"no {kind} model in the manifest"
    d = model_store.models_dir(models_dir)
    for e in candidates:
        if (d / e.file).is_file():
            return True, f"{e.name}: {d / e.file}"
    names = ", ".join(f"{d / e.file}" for e in candidates)
    return False, f"no weights: none of {names} exists (`perception2d models fetch` / export)"


def _skip(stage: str, reason: str) -> dict[str, Any]:
    return {"stage": stage, "skipped": reason, "machine": machine_info()}


# --------------------------------------------------------------------------- main entry
def run_stage(stage: str, *, frames: int = 100, size: tuple[int, int] = (1280, 720),
              threads: int | None = None, warmup: int = 5, dds: bool = False,
              backend: str = "auto", model: str = "yolox_nano",
              models_dir: str | None = None) -> dict[str, Any]:
    """Benchmark one stage; returns the result dict (see module docstring)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}; got {stage!r}")
    if stage in MODEL_STAGES:
        ok, why = model_weights_status(stage, models_dir)
        if not ok:
            return _skip(stage, why)
        return _skip(stage, f"weights present ({why}) but the {stage} stage benchmark needs the "
                            f"{stage} pipeline stage, which is not part of this harness yet")
    ros_env_defaults()
    n_threads = set_threads(threads)
    import rclpy
    from rclpy.context import Context

    ctx = Context()
    rclpy.init(args=[], context=ctx)
    try:
        return _run_node_stage(stage, ctx, frames=frames, size=size, threads=threads,
                               n_threads=n_threads, warmup=warmup, dds=dds, backend=backend,
                               model=model, models_dir=models_dir)
    finally:
        rclpy.try_shutdown(context=ctx)


def _make_node(stage: str, ctx: Any, threads: int | None, backend: str, model: str,
               models_dir: str | None, extra: dict[str, Any] | None = None) -> Any:
    from rclpy.parameter import Parameter

    from perception2d_ros.ros.perception_node import PerceptionNode

    params: dict[str, Any] = {"detect.backend": backend, "detect.model": model,
                              "diagnostics_period_s": 3600.0}
    if threads:
        params["detect.threads"] = int(threads)
    if models_dir:
        params["models_dir"] = models_dir
    params.update(extra or {})
    node = PerceptionNode(NODE_FOR[stage], node_name=f"bench_{stage}", context=ctx,
                          namespace="/bench", parameter_overrides=[
                              Parameter(k, value=v) for k, v in params.items()])
    if node.pipeline is None:
        node.destroy_node()
        raise RuntimeError(f"{NODE_FOR[stage]} failed to configure (see the log above)")
    return node


def _input_messages(stage: str, size: tuple[int, int], count: int) -> tuple[list[Any], Any,
                                                                            list[np.ndarray]]:
    """Image messages of real frames + the CameraInfo for the node's input.

    Rectified-input stages (detect) get the frames rectified by the same calibration and the
    rectified camera_info, as a rectify node upstream would publish them."""
    from std_msgs.msg import Header

    from perception2d_ros.geometry.camera import CameraModel
    from perception2d_ros.ros import conversions as conv

    imgs = real_frames(size, count)
    fields = camera_info_fields(size)
    cam = CameraModel.from_camera_info(fields)
    if NODE_FOR[stage] == "detector_node":
        imgs = [cam.rectify(i) for i in imgs]
        fields = cam.rectified_camera_info_dict()
    hdr = Header(frame_id="camera_optical")
    msgs = [conv.array_to_image_msg(i, "bgr8", hdr) for i in imgs]
    info = conv.camera_info_msg(fields, hdr)
    return msgs, info, imgs


def _set_stamp(msg: Any, ns: int) -> None:
    msg.header.stamp.sec = ns // 1_000_000_000
    msg.header.stamp.nanosec = ns % 1_000_000_000


# The node's internal input path, for both node layouts (single camera: ``node._pubs``,
# ``node.sync``, ``node._on_image(msg)``; multi-camera: ``node.cams[i].pubs`` / ``.sync`` and
# ``node._on_image(cam, msg)``): exactly what the subscription callbacks call.
def _pubs(node: Any) -> dict[str, Any]:
    return node.cams[0].pubs if hasattr(node, "cams") else node._pubs


def _feed_info(node: Any, info: Any, raw: bool) -> None:
    if hasattr(node, "cams"):
        cam = node.cams[0]
        if raw:
            cam.sync.add_info(info)
        else:
            cam.rect_info = info
    elif raw:
        node.sync.add_info(info)
    else:
        node._on_rect_info(info)


def _image_callback(node: Any, raw: bool) -> Callable[[Any], None]:
    fn = node._on_image if raw else node._on_rect_image
    if hasattr(node, "cams"):
        cam = node.cams[0]
        return lambda msg: fn(cam, msg)
    return fn


def _detector(node: Any) -> Any:
    for s in node.pipeline.stages:
        if s.name == "detect":
            return s.detector
    return None


def _run_node_stage(stage: str, ctx: Any, *, frames: int, size: tuple[int, int],
                    threads: int | None, n_threads: int, warmup: int, dds: bool,
                    backend: str, model: str, models_dir: str | None) -> dict[str, Any]:
    import cv2

    from perception2d_ros.geometry.camera import CameraModel
    from perception2d_ros.ros import conversions as conv

    node = _make_node(stage, ctx, threads, backend, model, models_dir)
    try:
        msgs, info, imgs = _input_messages(stage, size, min(8, max(frames, 1)))
        det = _detector(node)
        runner = _TimedRunner(node.runner)
        node.runner = runner
        done = threading.Event()
        record: dict[str, float] = {}
        last_topic, first_topic = LAST_TOPIC[stage], FIRST_TOPIC[stage]
        det_timings: dict[str, float] = {}

        def sink(topic: str, msg: Any, t: float) -> None:
            if topic == first_topic:
                record["first"] = t
            if topic == last_topic:
                record["last"] = t
                if det is not None:
                    det_timings.update(det.timings)
                done.set()

        pubs = _pubs(node)
        for topic in list(pubs):
            pubs[topic] = _TimedPublisher(pubs[topic], topic, sink)

        raw_input = NODE_FOR[stage] != "detector_node"
        on_image = _image_callback(node, raw_input)
        # floors: the node's own maps / engine on the same frames
        cam = CameraModel.from_camera_info(info) if raw_input else None
        if cam is not None:
            map1, map2 = conv.CameraModelCache().get(info).rectify_maps()
            remap_out = np.empty_like(imgs[0])
            interp = cv2.INTER_LINEAR
        # second floor for stages that publish an image: remap + rclpy publish() of a prebuilt
        # Image of the same size on a publisher of the same node (rclpy's own cost: message
        # conversion + serialisation copies, what any rclpy node pays to publish that image)
        publish_floor = None
        if cam is not None:
            from sensor_msgs.msg import Image as ImageMsg

            floor_pub = node.create_publisher(ImageMsg, "bench_publish_floor", 1)
            floor_msg = conv.array_to_image_msg(imgs[0], "bgr8", msgs[0].header)
            publish_floor = (floor_pub, floor_msg)
        tensors = []
        if det is not None:
            src = [cam.rectify(i) for i in imgs] if cam is not None else imgs
            tensors = [det.preprocess(i)[0].copy() for i in src]
            feed_name = det.input_name

        def floor_once(i: int) -> dict[str, float]:
            out = {}
            if cam is not None:
                t0 = time.perf_counter()
                cv2.remap(imgs[i], map1, map2, interp, dst=remap_out,
                          borderMode=cv2.BORDER_CONSTANT)
                out["remap"] = time.perf_counter() - t0
                if publish_floor is not None and stage == "rectify":
                    t0 = time.perf_counter()
                    publish_floor[0].publish(publish_floor[1])
                    out["rclpy_publish"] = time.perf_counter() - t0
            if det is not None:
                t0 = time.perf_counter()
                det.engine.infer({feed_name: tensors[i]})
                out["infer"] = time.perf_counter() - t0
            return out

        stamp0 = time.time_ns()
        sample: dict[str, list[float]] = {k: [] for k in (
            "floor", "remap", "infer", "stage", "first_out", "handoff", "runner", "pipeline",
            "publish", "preprocess", "postprocess", "det_infer", "build",
            "rclpy_publish", "floor_with_publish")}
        for i in range(warmup + frames):
            k = i % len(msgs)
            fl = floor_once(k)
            msg = msgs[k]
            ns = stamp0 + i * 33_000_000
            _set_stamp(msg, ns)
            done.clear()
            record.clear()
            _set_stamp(info, ns)
            _feed_info(node, info, raw_input)
            t0 = time.perf_counter()
            on_image(msg)
            if not done.wait(30.0):
                raise RuntimeError(f"{stage}: no output within 30 s for frame {i}; node errors: "
                                   f"{dict(node.errors.counts)}")
            if i < warmup:
                continue
            t_last = record["last"]
            sample["stage"].append(t_last - t0)
            sample["first_out"].append(record.get("first", t_last) - t0)
            sample["handoff"].append(runner.t_start - t0)
            sample["runner"].append(runner.t_end - runner.t_start)
            total = runner.timings.get("total", 0.0)
            sample["pipeline"].append(total)
            sample["build"].append(runner.t_end - runner.t_start - total)
            sample["publish"].append(t_last - runner.t_end)
            for key, v in fl.items():
                sample[key].append(v)
            sample["floor"].append(sum(v for k, v in fl.items() if k != "rclpy_publish"))
            if "rclpy_publish" in fl:
                sample["floor_with_publish"].append(sum(fl.values()))
            if det is not None:
                sample["preprocess"].append(det_timings.get("preprocess", 0.0) / 1e3)
                sample["det_infer"].append(det_timings.get("infer", 0.0) / 1e3)
                sample["postprocess"].append(det_timings.get("postprocess", 0.0) / 1e3)

        floor = summarize_ms(sample["floor"])
        st = summarize_ms(sample["stage"])
        engine = det.engine if det is not None else None
        result: dict[str, Any] = {
            "stage": stage,
            "node": NODE_FOR[stage],
            "floor_ms": floor["p50"],
            "stage_ms": st["p50"],
            "ratio": round(st["p50"] / floor["p50"], 3) if floor["p50"] > 0 else None,
            "p50_ms": st["p50"], "p95_ms": st["p95"], "max_ms": st["max"],
            "floor_p95_ms": floor["p95"],
            "target_ratio": {"rectify": 1.3, "detect": 1.15}.get(stage),
            "floor": {"rectify": "cv2.remap, node's CV_16SC2 maps, preallocated output",
                      "detect": "engine.infer on the same preprocessed tensor",
                      "pipeline": "cv2.remap (preallocated) + engine.infer"}[stage],
            "stage_measures": "node message-in (subscription callback) -> last output "
                              "message publish() returned",
            "included": INCLUDED, "excluded": EXCLUDED,
            "outputs": sorted(t for t in pubs if t not in ("detections/label_info",)),
            "frames": frames, "warmup": warmup,
            "size": f"{size[0]}x{size[1]}", "encoding": "bgr8",
            "input": "real COCO test images resized; calibration test/data/camera_info/"
                     "camerav1_1280x720.yaml" + ("" if size == (1280, 720) else " (scaled)"),
            "threads": {"opencv": n_threads, "requested": threads or "default"},
            "backend": f"{engine.backend}({engine.device})" if engine else "opencv",
            "model": getattr(det, "model_name", None) or ("-" if det is None else model),
            "breakdown_ms_p50": {
                "handoff_sync_slot_wake": summarize_ms(sample["handoff"])["p50"],
                "runner_convert_pipeline_build": summarize_ms(sample["runner"])["p50"],
                "pipeline_stages": summarize_ms(sample["pipeline"])["p50"],
                "convert_in_and_build_msgs": summarize_ms(sample["build"])["p50"],
                "publish_all_outputs": summarize_ms(sample["publish"])["p50"],
                "first_output_published": summarize_ms(sample["first_out"])["p50"],
            },
            "floor_parts_ms_p50": {k: summarize_ms(sample[k])["p50"]
                                   for k in ("remap", "infer", "rclpy_publish") if sample[k]},
            "machine": machine_info(),
        }
        if sample["floor_with_publish"]:
            fwp = summarize_ms(sample["floor_with_publish"])["p50"]
            result["floor_with_publish_ms"] = fwp
            result["ratio_vs_floor_with_publish"] = round(st["p50"] / fwp, 3) if fwp else None
            result["floor_with_publish"] = ("cv2.remap as above + rclpy publish() of a prebuilt "
                                            "Image of the same size (no subscriber)")
        if det is not None:
            result["breakdown_ms_p50"].update({
                "detector_preprocess": summarize_ms(sample["preprocess"])["p50"],
                "detector_infer": summarize_ms(sample["det_infer"])["p50"],
                "detector_postprocess": summarize_ms(sample["postprocess"])["p50"]})
            result["engine"] = engine.describe()
        result["node_diagnostics"] = {k: v for k, v in node.diagnostics().items()
                                      if k.endswith("_p50") or k.startswith("frames")
                                      or k.startswith("dropped") or k.startswith("errors")}
    finally:
        _restore_publishers(node)
        node.destroy_node()
    if dds:
        result["dds"] = run_dds_lockstep(stage, frames=frames, size=size, threads=threads,
                                         backend=backend, model=model, models_dir=models_dir,
                                         warmup=warmup, in_node_ms=result["stage_ms"])
        result["dds"]["hop"] = run_dds_hop(size=size, frames=min(frames, 50), warmup=warmup)
    return result


def _restore_publishers(node: Any) -> None:
    try:
        pubs = _pubs(node)
    except AttributeError:
        return
    for topic, pub in list(pubs.items()):
        if isinstance(pub, _TimedPublisher):
            pubs[topic] = pub._pub


# --------------------------------------------------------------------------- over DDS
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
        node = _make_node(stage, ctx, threads, backend, model, models_dir)
        drv = rclpy.create_node("bench_driver", context=ctx, namespace="/bench")
        executor.add_node(node)
        executor.add_node(drv)
        spin = threading.Thread(target=executor.spin, daemon=True)
        spin.start()
        msgs, info, _ = _input_messages(stage, size, min(8, max(frames, 1)))
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
            _set_stamp(msg, ns)
            _set_stamp(info, ns)
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
    child = subprocess.Popen([sys.executable, "-m", "perception2d_ros.bench.stages", "hop-echo"],
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
                _set_stamp(img, ns)
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
        sys.exit("usage: python -m perception2d_ros.bench.stages hop-echo  (bench helper)")
