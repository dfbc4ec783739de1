"""``perception2d process IN_BAG -o OUT.mcap [--params-file FILE]``: run the pipeline over a
recorded bag as fast as it can, without DDS. Writes the input topics it used plus every output
topic (same names and types as live; output headers equal their input frame's header).

The input may be a rosbag2 bag (MCAP, sqlite3) or a ROS 1 ``.bag``; the output is always a
ROS 2 bag. The camera stream is found by itself: ``<ns>/image_raw`` (sensor_msgs/Image) or
``<ns>/image_raw/compressed`` (sensor_msgs/CompressedImage, jpeg/png, decoded to bgr8), else
any image topic with a camera_info beside it (``--image-topic`` to pick one).

With ``extrinsics.source: tf`` the bag's ``/tf_static`` and ``/tf`` are read first (all of
them: dynamic transforms are interpolated at each image stamp, both sides known); with
``depth_topic`` each frame is paired with the depth image nearest in stamp (within
``sync_slop_ms``, default 20 ms)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("process", help="run the pipeline over a recorded bag (offline)")
    p.add_argument("bag", help="input bag (.mcap, .db3, rosbag2 directory or ROS 1 .bag)")
    p.add_argument("-o", "--output", required=True, help="output bag (.mcap)")
    p.add_argument("--params-file", default=None)
    p.add_argument("--namespace", default=None,
                   help="camera namespace (default: the one of the bag's */image_raw or "
                        "*/image_raw/compressed topic)")
    p.add_argument("--image-topic", default=None,
                   help="the image topic to use (an Image or …/compressed CompressedImage "
                        "topic; default: found by itself)")
    p.add_argument("--debug-image", action="store_true", help="also write debug_image")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from perception2d_ros.cli.errors import check_input_bag, check_output_path, load_params

    # every cheap check before any model is loaded: bag, output, params
    check_input_bag(args.bag)
    check_output_path(args.output, args.overwrite)
    cfg = load_params(args.params_file)
    stats = process_bag(args.bag, args.output, cfg, namespace=args.namespace,
                        debug_image=args.debug_image, overwrite=args.overwrite,
                        image_topic=args.image_topic)
    print(f"processed {stats['frames_out']}/{stats['frames_in']} frames "
          f"({stats['errors']} rejected) in {stats['seconds']:.1f} s -> {args.output}")
    return 0 if stats["frames_out"] else 1


def process_bag(in_path: str | Path, out_path: str | Path, cfg: dict, *,
                namespace: str | None = None, debug_image: bool = False,
                overwrite: bool = False, progress: bool = True,
                image_topic: str | None = None) -> dict:
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import CameraInfo, CompressedImage, Image
    from tqdm import tqdm

    from perception2d_ros.io.bag_reader import BagReader
    from perception2d_ros.io.bag_topics import find_camera_topics
    from perception2d_ros.io.bag_types import find_interface_dirs
    from perception2d_ros.io.bag_writer import BagWriter, storage_for_path
    from perception2d_ros.pipeline.flow import ApproximateSync, ErrorReporter, StampMatcher
    from perception2d_ros.pipeline.build import build_pipeline
    from perception2d_ros.ros.publishing import TOPIC_TYPES, FrameRunner

    msg_dirs = find_interface_dirs()
    from perception2d_ros.cli.errors import UserError

    try:
        storage_for_path(out_path)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    raw_input = "rectify" in cfg["stages"]
    with BagReader(in_path, msg_dirs=msg_dirs) as reader:
        topics = reader.topics
        try:
            cam = find_camera_topics(topics, rectified=not raw_input, namespace=namespace,
                                     image_topic=image_topic)
        except ValueError as exc:
            raise UserError(f"{exc}; pick the camera with --namespace or --image-topic",
                            1) from None
        if raw_input and cam.camera_info is None:
            raise UserError(f"no sensor_msgs/CameraInfo topic {cam.namespace}/camera_info "
                            f"beside {cam.image} (rectify needs the calibration); record it "
                            "or drop rectify from stages", 1)
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
    from rclpy.serialization import deserialize_message
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
