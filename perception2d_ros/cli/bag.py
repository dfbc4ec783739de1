"""``perception2d bag``: make, play, record and inspect rosbag2 bags (MCAP by default).

* ``bag make`` turns an image folder or a video plus a calibration YAML into a bag with
  ``<ns>/image_raw`` (bgr8; or ``<ns>/image_raw/compressed`` with ``--format jpeg|png``, as
  image_transport's compressed publisher writes it) and ``<ns>/camera_info`` at evenly
  spaced, real timestamps;
* ``bag play`` / ``bag record`` move bags to and from live ROS 2 topics (rclpy);
* ``bag info`` summarises a bag and its camera streams (``--json`` for machines).

ROS 1 ``.bag`` files are read by ``play`` and ``info`` (messages converted to ROS 2).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp",
                            ".pgm", ".ppm", ".pnm"})
_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, KeyError,
           TimeoutError, ImportError, RuntimeError)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def parse_size(text: str) -> tuple[int, int]:
    """``"640x480"`` -> ``(640, 480)``; raises ``ValueError`` on anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not match:
        raise ValueError(f"size must look like WIDTHxHEIGHT (e.g. 640x480), got {text!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return width, height


def parse_epoch_ns(text: str) -> int:
    """Seconds since the epoch (``"1700000000.25"``) -> exact integer nanoseconds."""
    from decimal import Decimal, InvalidOperation

    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise ValueError(f"start time must be seconds since the epoch, got {text!r}") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"start time must be a non-negative number of seconds, got {text!r}")
    return int(value * 1_000_000_000)


def normalize_namespace(namespace: str) -> str:
    """``"camera/"`` -> ``"/camera"``; ``"/"`` or ``""`` -> ``""`` (topics at the root)."""
    ns = "/" + namespace.strip().strip("/")
    if ns == "/":
        return ""
    if not re.fullmatch(r"(/[A-Za-z_][A-Za-z0-9_]*)+", ns):
        raise ValueError(f"invalid ROS namespace {namespace!r}")
    return ns


def list_images(directory: str | os.PathLike[str]) -> list[Path]:
    """Image files directly in ``directory``, sorted by file name."""
    root = Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(f"image directory {root} does not exist")
    files = sorted((p for p in root.iterdir()
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(
            f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root}")
    return files


def _load_camera_info(path: str | os.PathLike[str]) -> tuple[dict[str, Any], tuple[int, int]]:
    """camera_info dict and the (width, height) of the images it describes."""
    from perception2d_ros.geometry.camera import CameraModel

    if not Path(path).is_file():
        raise FileNotFoundError(f"camera info YAML {path} does not exist")
    model = CameraModel.from_yaml(path)
    info = dict(model.to_camera_info_dict())
    size = getattr(model, "image_size", None) or (info["width"], info["height"])
    return info, (int(size[0]), int(size[1]))


def _frames_from_images(files: list[Path]) -> Iterator[tuple[str, Any]]:
    from perception2d_ros.io.image_files import read_image

    for path in files:
        yield path.name, read_image(path)  # ImageFileError (a ValueError) if truncated


def _frames_from_video(capture: Any, name: str) -> Iterator[tuple[str, Any]]:
    index = 0
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            yield f"{name}#{index}", frame
            index += 1
    finally:
        capture.release()
    if index == 0:
        raise ValueError(f"no frames could be decoded from video {name}")


def make_bag(
    out: str | os.PathLike[str],
    camera_info: str | os.PathLike[str],
    *,
    images: str | os.PathLike[str] | None = None,
    video: str | os.PathLike[str] | None = None,
    rate: float | None = None,
    frame_id: str = "camera",
    storage: str | None = None,
    namespace: str = "/camera",
    limit: int | None = None,
    resize: tuple[int, int] | None = None,
    start_time_ns: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    image_format: str = "raw",
    jpeg_quality: int = 95,
) -> dict[str, Any]:
    """Write a camera bag: ``<ns>/image_raw`` (bgr8) + one ``<ns>/camera_info`` per image.

    With ``image_format`` ``jpeg`` or ``png`` the images go to ``<ns>/image_raw/compressed``
    as sensor_msgs/CompressedImage, format ``"bgr8; jpeg compressed bgr8"`` (resp. png) as
    image_transport's compressed publisher writes it — what camera bags recorded on robots
    hold.

    Both messages of frame ``i`` carry the same header (stamp ``start + i / rate``, frame id)
    and are stored with that stamp as the bag time.

    Args:
        out: output bag (``.mcap``/``.db3`` file or a rosbag2 directory).
        camera_info: calibration YAML (``CameraModel.from_yaml``: camera_calibration_parsers
            layout or a ROS 1 / ROS 2 CameraInfo dump).
        images: directory of images (read in file-name order) — or
        video: a video file (frames in order).
        rate: frames per second; defaults to the video's frame rate (required for images).
        frame_id: header frame id.
        storage: ``"mcap"`` or ``"sqlite3"`` (default from ``out``'s suffix, else mcap).
        namespace: topic namespace.
        limit: at most this many frames.
        resize: ``(width, height)`` to scale every frame to; must equal the camera_info size.
        start_time_ns: stamp of the first frame (default: now).
        overwrite: replace an existing output.
        progress: tqdm bar on stderr.
        image_format: ``raw`` (sensor_msgs/Image), ``jpeg`` or ``png`` (CompressedImage).
        jpeg_quality: JPEG quality 0..100 (image_transport's default, 95).

    Returns:
        ``{"path", "storage", "frames", "rate", "start_ns", "end_ns", "topics"}``.

    Raises:
        ValueError: bad arguments, unreadable frames, or a frame size that differs from the
            camera_info size (without a matching ``resize``).
    """
    import cv2
    from tqdm import tqdm

    from perception2d_ros.io.bag_messages import camera_info_msg, compressed_image_msg, image_msg
    from perception2d_ros.io.bag_writer import BagWriter
    from perception2d_ros.io.image_codec import COMPRESSED_CODECS, encode_compressed

    if image_format not in ("raw", *COMPRESSED_CODECS):
        raise ValueError(f"image format must be raw, {' or '.join(COMPRESSED_CODECS)}, got "
                         f"{image_format!r}")
    if not 0 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg quality must be in 0..100, got {jpeg_quality}")
    if (images is None) == (video is None):
        raise ValueError("give exactly one of images (a directory) or video (a file)")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if not frame_id:
        raise ValueError("frame_id must not be empty")
    ns = normalize_namespace(namespace)
    info, cam_size = _load_camera_info(camera_info)
    if resize is not None and tuple(resize) != cam_size:
        raise ValueError(
            f"--resize {resize[0]}x{resize[1]} differs from the camera_info size "
            f"{cam_size[0]}x{cam_size[1]} of {camera_info}; the images must end up at the "
            "calibrated size")

    total: int | None
    if images is not None:
        files = list_images(images)
        if limit is not None:
            files = files[:limit]
        total = len(files)
        frames = _frames_from_images(files)
        source = str(images)
    else:
        video_path = Path(video)  # type: ignore[arg-type]
        if not video_path.is_file():
            raise FileNotFoundError(f"video {video_path} does not exist")
        capture = cv2.VideoCapture(str(video_path))
        if not capture.isOpened():
            raise ValueError(f"cannot open video {video_path} (unsupported codec/container?)")
        if rate is None:
            fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
            if not fps > 0:
                capture.release()
                raise ValueError(f"video {video_path} reports no frame rate; pass --rate")
            rate = fps
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        total = min(count, limit) if count > 0 and limit else (count or limit or None)
        frames = _frames_from_video(capture, video_path.name)
        source = str(video_path)
    if rate is None:
        raise ValueError("--rate is required for an image directory")
    if not (rate > 0 and rate < 1e9):
        raise ValueError(f"rate must be a positive frequency in Hz, got {rate}")

    start_ns = time.time_ns() if start_time_ns is None else int(start_time_ns)
    if start_ns < 0:
        raise ValueError(f"start time must be >= 0, got {start_ns} ns")
    compressed = image_format != "raw"
    image_topic = f"{ns}/image_raw/compressed" if compressed else f"{ns}/image_raw"
    info_topic = f"{ns}/camera_info"
    written = 0
    last_ns = start_ns
    with BagWriter(out, storage, overwrite=overwrite) as bag:
        bag.add_topic(image_topic, "sensor_msgs/msg/CompressedImage" if compressed
                      else "sensor_msgs/msg/Image")
        bag.add_topic(info_topic, "sensor_msgs/msg/CameraInfo")
        bar = tqdm(total=total, desc=f"bag make {Path(out).name}", unit="frame",
                   file=sys.stderr, disable=not progress)
        try:
            for name, frame in frames:
                if limit is not None and written >= limit:
                    break
                height, width = frame.shape[:2]
                if resize is not None:
                    if (width, height) != cam_size:
                        frame = cv2.resize(frame, cam_size, interpolation=cv2.INTER_AREA)
                elif (width, height) != cam_size:
                    raise ValueError(
                        f"{name} is {width}x{height} but camera_info {camera_info} is "
                        f"{cam_size[0]}x{cam_size[1]}; use a matching camera_info or pass "
                        f"--resize {cam_size[0]}x{cam_size[1]} to scale the frames")
                if frame.ndim == 2:
                    frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
                stamp = start_ns + round(written * 1e9 / rate)
                if compressed:
                    fmt, data = encode_compressed(frame, image_format, jpeg_quality=jpeg_quality)
                    msg = compressed_image_msg(bag.typestore, fmt, data, stamp, frame_id)
                else:
                    msg = image_msg(bag.typestore, frame, stamp, frame_id)
                bag.write(image_topic, stamp, msg)
                bag.write(info_topic, stamp, camera_info_msg(bag.typestore, info, stamp, frame_id))
                last_ns = stamp
                written += 1
                bar.update(1)
        finally:
            bar.close()
        if written == 0:
            raise ValueError(f"no frames read from {source}")
        storage_id = bag.storage
    return {
        "path": str(out),
        "storage": storage_id,
        "frames": written,
        "rate": float(rate),
        "start_ns": start_ns,
        "end_ns": last_ns,
        "topics": [image_topic, info_topic],
        "format": image_format,
    }


def _fmt_time(ns: int | None) -> str:
    if ns is None:
        return "-"
    utc = datetime.fromtimestamp(ns / 1e9, tz=timezone.utc)
    return f"{utc.strftime('%Y-%m-%d %H:%M:%S.%f')} UTC ({ns // 10**9}.{ns % 10**9:09d})"


def format_info(info: dict[str, Any]) -> str:
    """Human-readable form of :func:`perception2d_ros.io.bag_topics.bag_info`."""
    lines = [
        f"Path:      {info['path']}",
        f"Storage:   {info['storage']}",
        f"Messages:  {info['message_count']}",
        f"Duration:  {info['duration_ns'] / 1e9:.9f} s",
        f"Start:     {_fmt_time(info['start_ns'])}",
        f"End:       {_fmt_time(info['end_ns'])}",
        "Topics:",
    ]
    width_name = max((len(n) for n in info["topics"]), default=0)
    width_type = max((len(t["type"]) for t in info["topics"].values()), default=0)
    for name, topic in info["topics"].items():
        qos = topic["qos"][0] if topic["qos"] else None
        qos_text = f"  [{qos['reliability']}, {qos['durability']}]" if qos else ""
        lines.append(f"  {name:<{width_name}}  {topic['type']:<{width_type}}  "
                     f"{topic['count']:>8} msgs{qos_text}")
    cameras = info.get("cameras") or []
    if cameras:
        lines.append("Cameras:")
    for cam in cameras:
        kind = cam["transport"] + (f" ({cam['format']})" if cam.get("format") else "")
        calib = cam["camera_info"] or "no camera_info"
        lines.append(f"  {cam['image']}  {kind}, {cam['frames']} frames, {calib}")
    return "\n".join(lines)


def _error(args: argparse.Namespace, exc: BaseException) -> int:
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    print(f"perception2d bag {args.bag_command}: error: {message}", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------
def _cmd_make(args: argparse.Namespace) -> int:
    try:
        start_ns = None if args.start_time is None else parse_epoch_ns(args.start_time)
        summary = make_bag(
            args.out, args.camera_info, images=args.images, video=args.video, rate=args.rate,
            frame_id=args.frame_id, storage=args.storage, namespace=args.namespace,
            limit=args.limit, resize=parse_size(args.resize) if args.resize else None,
            start_time_ns=start_ns, overwrite=args.overwrite, image_format=args.format,
            jpeg_quality=args.jpeg_quality,
        )
    except _ERRORS as exc:
        return _error(args, exc)
    print(f"wrote {summary['frames']} frames ({', '.join(summary['topics'])}) at "
          f"{summary['rate']:g} Hz to {summary['path']} [{summary['storage']}]")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from perception2d_ros.io.bag_topics import bag_info

    try:
        info = bag_info(args.bag)
    except _ERRORS as exc:
        return _error(args, exc)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _cmd_play(args: argparse.Namespace) -> int:
    from perception2d_ros.ros.bag_play import play

    try:
        counts = play(
            args.bag, rate=args.rate, loop=args.loop, topics=args.topics,
            wait_subscribers=args.wait_subscribers, wait_timeout=args.wait_timeout,
            reliable=args.reliable, ros_args=args.ros_args, handle_signals=True,
            progress=True,
        )
    except _ERRORS as exc:
        return _error(args, exc)
    print(f"published {sum(counts.values())} messages: "
          + ", ".join(f"{t} {n}" for t, n in counts.items()))
    return 0


def _cmd_record(args: argparse.Namespace) -> int:
    from perception2d_ros.ros.bag_record import record

    try:
        counts = record(
            args.output, args.topics, duration=args.duration, max_messages=args.messages,
            topic_timeout=args.topic_timeout, storage=args.storage, overwrite=args.overwrite,
            ros_args=args.ros_args, handle_signals=True, progress=True,
        )
    except _ERRORS as exc:
        return _error(args, exc)
    print(f"recorded {sum(counts.values())} messages to {args.output}: "
          + ", ".join(f"{t} {n}" for t, n in counts.items()))
    return 0


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def add_parser(subparsers: Any) -> None:
    """Register ``perception2d bag {make,play,record,info}``."""
    parser = subparsers.add_parser("bag", help="make, play, record and inspect bags (MCAP)",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bag_command", metavar="ACTION", required=True)

    make = sub.add_parser("make", help="images/video + camera_info YAML -> camera bag")
    src = make.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="directory of images (sorted by name)")
    src.add_argument("--video", metavar="FILE", help="video file")
    make.add_argument("--camera-info", metavar="YAML", required=True,
                      help="calibration YAML: camera_calibration_parsers layout, or a CameraInfo "
                           "dump (`ros2 topic echo --once …/camera_info`, `rostopic echo -n1`)")
    make.add_argument("--format", choices=["raw", "jpeg", "png"], default="raw",
                      help="raw: sensor_msgs/Image on <ns>/image_raw (default); jpeg/png: "
                           "sensor_msgs/CompressedImage on <ns>/image_raw/compressed")
    make.add_argument("--jpeg-quality", metavar="Q", type=int, default=95,
                      help="JPEG quality for --format jpeg (95, image_transport's default)")
    make.add_argument("--rate", metavar="HZ", type=_positive_float,
                      help="frame rate (default: the video's; required for --images)")
    make.add_argument("--frame-id", metavar="ID", default="camera",
                      help="header frame_id (default: camera)")
    make.add_argument("--storage", choices=["mcap", "sqlite3"],
                      help="storage plugin (default: from OUT's suffix, else mcap)")
    make.add_argument("--namespace", default="/camera", help="topic namespace (default /camera)")
    make.add_argument("--limit", metavar="N", type=_positive_int, help="at most N frames")
    make.add_argument("--resize", metavar="WxH",
                      help="scale frames to WxH (must equal the camera_info size)")
    make.add_argument("--start-time", metavar="SEC",
                      help="stamp of the first frame, seconds since the epoch (default: now)")
    make.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    make.add_argument("out", metavar="OUT",
                      help="output: OUT.mcap / OUT.db3 file, or a rosbag2 directory")
    make.set_defaults(func=_cmd_make)

    play = sub.add_parser("play", help="publish a bag with its recorded timing")
    play.add_argument("bag", metavar="IN", help="bag directory, .mcap/.db3 file or ROS 1 .bag")
    play.add_argument("--rate", type=_positive_float, default=1.0, help="speed factor (1.0)")
    play.add_argument("--loop", action="store_true", help="repeat until interrupted")
    play.add_argument("--topics", nargs="+", metavar="TOPIC", help="only these topics")
    play.add_argument("--wait-subscribers", metavar="N", type=int, default=0,
                      help="wait until every topic has N subscribers before playing")
    play.add_argument("--wait-timeout", metavar="S", type=_positive_float, default=10.0,
                      help="bound on that wait in seconds (10)")
    play.add_argument("--reliable", action="store_true",
                      help="publish reliable instead of best effort (label_info is always "
                           "reliable + transient local)")
    play.set_defaults(func=_cmd_play, accepts_ros_args=True)

    rec = sub.add_parser("record", help="record topics into an MCAP bag")
    rec.add_argument("-o", "--output", metavar="OUT", required=True,
                     help="output: OUT.mcap / OUT.db3 file, or a rosbag2 directory")
    rec.add_argument("topics", nargs="+", metavar="TOPIC", help="topics to record")
    rec.add_argument("--duration", metavar="S", type=_positive_float,
                     help="stop after S seconds")
    rec.add_argument("--messages", metavar="N", type=_positive_int,
                     help="stop after N messages in total")
    rec.add_argument("--topic-timeout", metavar="S", type=_positive_float, default=10.0,
                     help="how long to wait for the topics to appear (10)")
    rec.add_argument("--storage", choices=["mcap", "sqlite3"], help="storage (default mcap)")
    rec.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    rec.set_defaults(func=_cmd_record, accepts_ros_args=True)

    info = sub.add_parser("info", help="summarise a bag")
    info.add_argument("bag", metavar="IN", help="bag directory, .mcap/.db3 file or ROS 1 .bag")
    info.add_argument("--json", action="store_true", help="machine-readable JSON")
    info.set_defaults(func=_cmd_info)
