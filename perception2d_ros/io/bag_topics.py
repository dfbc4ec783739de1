"""What a bag holds: its camera streams (:func:`image_streams`, :func:`find_camera_topics`
choosing the one a pipeline reads) and a JSON-ready summary (:func:`bag_info`).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rosbags.interfaces import Qos

from perception2d_ros.io.bag_reader import BagReader
from perception2d_ros.io.bag_types import CAMERA_INFO_TYPE, COMPRESSED_IMAGE_TYPE, IMAGE_TYPE

__all__ = ["CameraTopics", "bag_info", "find_camera_topics", "image_streams"]


@dataclass(frozen=True)
class CameraTopics:
    """The camera streams of a bag: ``image`` (an Image or a CompressedImage topic),
    ``transport`` (``"raw"`` / ``"compressed"``, image_transport's names), the matching
    ``camera_info`` (None when absent) and ``namespace`` (where outputs go)."""

    image: str
    transport: str
    camera_info: str | None
    namespace: str

    @property
    def base(self) -> str:
        """The image_transport base topic (``…/image_raw`` for ``…/image_raw/compressed``)."""
        return self.image[: -len("/compressed")] if self.transport == "compressed" else self.image


def _msgtype_of(meta: Any) -> str:
    if isinstance(meta, str):
        return meta
    if isinstance(meta, Mapping):
        return str(meta.get("type", ""))
    return str(getattr(meta, "msgtype", ""))


def image_streams(topics: Mapping[str, Any]) -> list[CameraTopics]:
    """Every camera image topic of a bag (Image topics and ``…/compressed`` CompressedImage
    topics), each with the CameraInfo topic of its namespace (``camera_info``, or for
    ``image_rect`` ``camera_info_rect`` first), sorted by topic.

    ``topics`` maps topic names to a :class:`TopicMeta`, a :func:`bag_info` topic dict or a
    type name.
    """
    types = {name: _msgtype_of(meta) for name, meta in topics.items()}
    out = []
    for name, msgtype in sorted(types.items()):
        if msgtype == IMAGE_TYPE:
            transport, base = "raw", name
        elif msgtype == COMPRESSED_IMAGE_TYPE and name.endswith("/compressed"):
            transport, base = "compressed", name[: -len("/compressed")]
        else:
            continue
        ns, leaf = base.rsplit("/", 1) if "/" in base else ("", base)
        names = ["camera_info_rect", "camera_info"] if leaf == "image_rect" else ["camera_info"]
        info = next((f"{ns}/{n}" for n in names if types.get(f"{ns}/{n}") == CAMERA_INFO_TYPE),
                    None)
        out.append(CameraTopics(name, transport, info, ns))
    return out


def find_camera_topics(
    topics: Mapping[str, Any],
    *,
    rectified: bool = False,
    namespace: str | None = None,
    image_topic: str | None = None,
) -> CameraTopics:
    """The camera stream a pipeline should read from a bag, found by itself.

    Preference: ``<ns>/image_raw`` (sensor_msgs/Image), then ``<ns>/image_raw/compressed``
    (sensor_msgs/CompressedImage, image_transport's compressed format) — raw first, it needs
    no decoding; with ``rectified`` (no rectify stage) ``image_rect`` before ``image_raw``.
    Failing those, any image topic whose namespace has a ``camera_info`` (e.g. a driver's
    ``…/image/compressed``). Among streams of one name, one with a ``camera_info`` beside it
    wins (a colour camera over its ``…/depth/image_raw``); other ties by topic name.

    Args:
        topics: topic name -> :class:`TopicMeta`, :func:`bag_info` topic dict or type name.
        rectified: the images are used as they come (no rectify stage); camera_info is then
            optional.
        namespace: only streams in this namespace (``/camera``).
        image_topic: exactly this topic (an Image or CompressedImage topic).

    Raises:
        ValueError: one line naming what was looked for and the image topics there are.
    """
    streams = image_streams(topics)
    if image_topic is not None:
        chosen = [s for s in streams if s.image == image_topic]
        if not chosen:
            raise ValueError(
                f"{image_topic} is not a sensor_msgs/Image or …/compressed "
                f"sensor_msgs/CompressedImage topic of the bag (image topics: "
                f"{', '.join(s.image for s in streams) or 'none'})")
        return chosen[0]
    if namespace is not None:
        ns = "/" + namespace.strip("/") if namespace.strip("/") else ""
        streams_ns = [s for s in streams if s.namespace == ns]
    else:
        streams_ns = streams
    leaves = ["image_rect", "image_raw"] if rectified else ["image_raw"]
    for leaf in leaves:
        named = [s for s in streams_ns if s.base.rsplit("/", 1)[-1] == leaf]
        if named:  # a camera beside its camera_info first (not e.g. <ns>/depth/image_raw)
            return sorted(named, key=lambda s: (s.camera_info is None, s.transport != "raw",
                                                s.image))[0]
    usable = [s for s in streams_ns if rectified or s.camera_info is not None]
    if usable:
        return sorted(usable, key=lambda s: (s.transport != "raw", s.image))[0]
    where = f" in namespace {namespace}" if namespace is not None else ""
    wanted = " or ".join(f"<ns>/{leaf} (Image) or <ns>/{leaf}/compressed (CompressedImage)"
                         for leaf in leaves)
    raise ValueError(
        f"no camera image topic{where}: expected {wanted}"
        + ("" if rectified else " with a <ns>/camera_info")
        + f"; image topics in the bag: {', '.join(s.image for s in streams) or 'none'}")


def _qos_to_dict(qos: Qos) -> dict[str, Any]:
    return {
        "history": qos.history.name.lower(),
        "depth": int(qos.depth),
        "reliability": qos.reliability.name.lower(),
        "durability": qos.durability.name.lower(),
    }


def bag_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Summary of a bag as plain python (JSON-serialisable).

    Returns:
        ``{"path", "storage", "message_count", "start_ns", "end_ns", "duration_ns",
        "duration_s", "topics": {name: {"type", "count", "qos": [...]}}, "cameras": [...]}``;
        ``start_ns`` and ``end_ns`` are the first/last message timestamps (None when empty);
        ``cameras`` lists the image streams (:func:`image_streams`): ``{"image",
        "transport", "camera_info", "frames"}`` plus, for compressed ones, the ``format`` of
        the first message (e.g. ``"bgr8; jpeg compressed bgr8"``). ``storage`` is
        ``rosbag1`` for a ROS 1 bag.
    """
    with BagReader(path) as reader:
        span = reader.time_range()
        start, end = span if span else (None, None)
        duration = (end - start) if span else 0
        topics = {
            name: {"type": meta.msgtype, "count": meta.count,
                   "qos": [_qos_to_dict(q) for q in meta.qos]}
            for name, meta in reader.topics.items()
        }
        cameras = []
        for cam in image_streams(reader.topics):
            entry: dict[str, Any] = {"image": cam.image, "transport": cam.transport,
                                     "camera_info": cam.camera_info,
                                     "frames": topics[cam.image]["count"]}
            if cam.transport == "compressed":
                entry["format"] = _first_format(reader, cam.image)
            cameras.append(entry)
        return {
            "path": str(reader.path),
            "storage": reader.storage,
            "message_count": reader.message_count,
            "start_ns": start,
            "end_ns": end,
            "duration_ns": duration,
            "duration_s": duration / 1e9,
            "topics": topics,
            "cameras": cameras,
        }


def _first_format(reader: BagReader, topic: str) -> str | None:
    """``format`` of the first CompressedImage on ``topic`` (None if unreadable or empty)."""
    for message in reader.messages([topic]):
        try:
            return str(reader.deserialize(message.rawdata, message.msgtype).format)
        except Exception:  # noqa: BLE001 - a summary; process/play report bad messages
            return None
    return None
