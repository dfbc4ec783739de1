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

from perception2d_ros.bench.common import (LAST_TOPIC, NODE_FOR, input_messages, machine_info,
                                           make_node, ros_env_defaults, set_stamp,
                                           set_threads, summarize_ms)
from perception2d_ros.bench.dds import run_dds_hop, run_dds_lockstep

STAGES = ("rectify", "detect", "pipeline", "sam", "clip", "lseg")
MODEL_STAGES = ("sam", "clip", "lseg")
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

    node = make_node(stage, ctx, threads, backend, model, models_dir)
    try:
        msgs, info, imgs = input_messages(stage, size, min(8, max(frames, 1)))
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
            set_stamp(msg, ns)
            done.clear()
            record.clear()
            set_stamp(info, ns)
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

