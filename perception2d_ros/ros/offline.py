"""The offline run of ``perception2d process``: a recorded camera stream through the pipeline
without DDS. Messages are deserialized from the input bag, paired (camera_info by stamp, depth
by stamp, TF read up front) and the outputs serialized into the output bag, with the same
topics, types and headers as the live nodes."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import CameraInfo, CompressedImage, Image


def process_camera(reader: Any, cam: Any, out_path: str | Path, cfg: dict, *,
                   msg_dirs: Any = None, debug_image: bool = False, overwrite: bool = False,
                   progress: bool = True) -> dict:
    """Run the pipeline of ``cfg`` over camera ``cam`` (io.bag_topics.find_camera_topics) of the
    open bag ``reader``; write its input topics and every output topic to ``out_path``.
    Returns the counts (frames_in, frames_out, errors, seconds, unmatched)."""
    from tqdm import tqdm

    from perception2d_ros.io.bag_writer import BagWriter
    from perception2d_ros.pipeline.build import build_pipeline
    from perception2d_ros.pipeline.flow import ApproximateSync, ErrorReporter, StampMatcher
    from perception2d_ros.ros.publishing import TOPIC_TYPES, FrameRunner

    topics = reader.topics
    image_topic, info_topic, ns = cam.image, cam.camera_info, cam.namespace
    image_cls = CompressedImage if cam.transport == "compressed" else Image
    # models load once the bag is known to hold what they need; their log lines are
    # printed once the pipeline is up (a failure prints only its one error line)
    built: list[str] = []
    pipeline = build_pipeline(cfg, log=built.append)
    for line in built:
        print(line, file=sys.stderr)
    warnings = ErrorReporter(lambda m: print(m, file=sys.stderr))
    runner = FrameRunner(pipeline, cfg, debug_image=debug_image, report=warnings.report)
    print(f"input: {image_topic} ({cam.transport})"
          + (f" + {info_topic}" if info_topic else "")
          + (" [ROS 1 bag]" if reader.is_ros1 else ""), file=sys.stderr)
    tf_topics = _tf_topics(topics) if runner.use_tf else []
    if runner.use_tf:
        _load_tf(reader, tf_topics, runner)
    depth_topic = _depth_topic(topics, ns, cfg) if runner.objects_enabled else None
    with BagWriter(out_path, msg_dirs=msg_dirs, overwrite=overwrite) as writer:
        for t in (image_topic, info_topic, depth_topic, *tf_topics):
            if t:
                writer.add_topic(t, topics[t].msgtype)
        declared: set[str] = set()

        def emit(rel: str, msg, stamp_ns: int) -> None:
            topic = f"{ns}/{rel}"
            if topic not in declared:
                writer.add_topic(topic, TOPIC_TYPES[rel])
                declared.add(topic)
            writer.write(topic, stamp_ns, serialize_message(msg))

        stats = {"frames_in": 0, "frames_out": 0, "errors": 0}
        first_ts: list[int] = []

        def run_frame(img_ts_raw, info, depth=None) -> None:
            ts, img = img_ts_raw
            if depth_topic and depth is None:
                warnings.report("depth", f"depth_topic: no depth image on {depth_topic} "
                                f"within {slop / 1e6:g} ms of frame {_stamp(img)}; its "
                                "objects use the ground plane")
            try:
                frame, msgs = runner.run(img, info, depth_msg=depth)
            except ValueError as exc:
                stats["errors"] += 1
                print(f"frame {ts} rejected: {exc}", file=sys.stderr)
                return
            if not first_ts:
                first_ts.append(ts)
                for rel, msg in runner.label_info():
                    emit(rel, msg, ts)
            for rel, msg in msgs:
                emit(rel, msg, ts)
            stats["frames_out"] += 1

        slop = int(float(cfg.get("sync_slop_ms", 20.0)) * 1e6)
        depth_sync = StampMatcher(lambda item, depth: run_frame(*item, depth), slop_ns=slop,
                                  max_pending=30, stale_s=None,
                                  stamp=_stamp) if depth_topic else None

        def on_pair(img_ts_raw, info) -> None:
            if depth_sync is not None:
                depth_sync.add_primary((img_ts_raw, info), _stamp(img_ts_raw[1]))
            else:
                run_frame(img_ts_raw, info)

        sync = ApproximateSync(on_pair, stamp=lambda m: _stamp(m[1] if isinstance(m, tuple)
                                                               else m))
        t0 = time.monotonic()
        wanted = [t for t in (image_topic, info_topic, depth_topic, *tf_topics) if t]
        n_images = topics[image_topic].count
        bar = tqdm(total=n_images, desc="process", unit="frame", disable=not progress,
                   file=sys.stderr)
        for msg in reader.messages(topics=wanted):
            writer.write(msg.topic, msg.timestamp_ns, msg.rawdata)
            if msg.topic == image_topic:
                stats["frames_in"] += 1
                img = deserialize_message(bytes(msg.rawdata), image_cls)
                if info_topic:
                    sync.add_image((msg.timestamp_ns, img))
                else:
                    on_pair((msg.timestamp_ns, img), None)
                bar.update(1)
            elif msg.topic == depth_topic:
                depth_sync.add_secondary(deserialize_message(bytes(msg.rawdata), Image))
            elif msg.topic == info_topic:
                sync.add_info(deserialize_message(bytes(msg.rawdata), CameraInfo))
        if depth_sync is not None:
            depth_sync.flush()
        bar.close()
    stats["seconds"] = time.monotonic() - t0
    stats["unmatched"] = sync.unmatched_images + sync.pending_images
    return stats


def _tf_topics(topics: dict) -> list[str]:
    """The bag's TF topics: ``/tf_static`` and ``/tf`` (also namespaced ``…/tf``)."""
    return sorted(t for t, meta in topics.items() if meta.msgtype == "tf2_msgs/msg/TFMessage"
                  and t.rsplit("/", 1)[-1] in ("tf", "tf_static"))


def _load_tf(reader, tf_topics: list[str], runner) -> None:
    """Every transform of the bag into the runner's TF buffer (kept for the whole bag)."""
    from tf2_msgs.msg import TFMessage

    from perception2d_ros.geometry.tf_buffer import TransformBuffer

    if not tf_topics:
        print("extrinsics.source tf: the bag has no /tf_static or /tf topic; ground positions "
              "and objects need them (or set extrinsics.source: params)", file=sys.stderr)
        return
    runner.tf_buffer = TransformBuffer(cache_s=10 * 365 * 86400.0)  # the whole bag
    n = 0
    for msg in reader.messages(topics=tf_topics):
        tf = deserialize_message(bytes(msg.rawdata), TFMessage)
        try:
            n += runner.tf_buffer.set_transforms(tf.transforms,
                                                 static=msg.topic.endswith("tf_static"))
        except ValueError as exc:
            runner.report("tf", f"{msg.topic}: {exc}; that transform is ignored")
    print(f"TF: {n} transforms from {', '.join(tf_topics)}; frames: "
          f"{', '.join(runner.tf_buffer.frames)}", file=sys.stderr)


def _depth_topic(topics: dict, ns: str, cfg: dict) -> str | None:
    rel = str(cfg.get("depth_topic") or "").strip()
    if not rel:
        return None
    topic = rel if rel.startswith("/") else f"{ns}/{rel}"
    if topic not in topics:
        raise SystemExit(f"depth_topic: {topic} is not in the bag (topics: {', '.join(topics)});"
                         " set depth_topic to the aligned depth image's topic or ''")
    return topic


def _stamp(msg) -> int:
    return int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
