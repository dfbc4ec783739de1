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
    """Check that the bag holds the camera the pipeline needs, then run it there
    (:func:`perception2d_ros.ros.offline.process_camera`); returns its counts."""
    from perception2d_ros.io.bag_reader import BagReader
    from perception2d_ros.io.bag_topics import find_camera_topics
    from perception2d_ros.io.bag_types import find_interface_dirs
    from perception2d_ros.io.bag_writer import storage_for_path
    from perception2d_ros.ros.offline import process_camera

    msg_dirs = find_interface_dirs()
    from perception2d_ros.cli.errors import UserError

    try:
        storage_for_path(out_path)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    raw_input = "rectify" in cfg["stages"]
    with BagReader(in_path, msg_dirs=msg_dirs) as reader:
        try:
            cam = find_camera_topics(reader.topics, rectified=not raw_input,
                                     namespace=namespace, image_topic=image_topic)
        except ValueError as exc:
            raise UserError(f"{exc}; pick the camera with --namespace or --image-topic",
                            1) from None
        if raw_input and cam.camera_info is None:
            raise UserError(f"no sensor_msgs/CameraInfo topic {cam.namespace}/camera_info "
                            f"beside {cam.image} (rectify needs the calibration); record it "
                            "or drop rectify from stages", 1)
        return process_camera(reader, cam, out_path, cfg, msg_dirs=msg_dirs,
                              debug_image=debug_image, overwrite=overwrite, progress=progress)
