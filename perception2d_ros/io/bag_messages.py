"""Building and reading the messages of bags without ROS: header stamps, rosbags
``sensor_msgs`` Image / CompressedImage / CameraInfo objects from arrays and calibrations, and
Image pixels back to numpy.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from perception2d_ros.io.bag_types import COMPRESSED_IMAGE_TYPE

__all__ = [
    "camera_info_msg",
    "compressed_image_msg",
    "image_msg",
    "image_to_numpy",
    "ns_to_stamp",
    "stamp_to_ns",
]

#: ``sensor_msgs/Image`` encodings understood by :func:`image_to_numpy` -> (dtype, channels).
_ENCODINGS: dict[str, tuple[str, int]] = {
    "bgr8": ("uint8", 3),
    "rgb8": ("uint8", 3),
    "bgra8": ("uint8", 4),
    "rgba8": ("uint8", 4),
    "mono8": ("uint8", 1),
    "8UC1": ("uint8", 1),
    "8UC3": ("uint8", 3),
    "mono16": ("uint16", 1),
    "16UC1": ("uint16", 1),
    "32FC1": ("float32", 1),
}


def ns_to_stamp(typestore: Any, stamp_ns: int) -> Any:
    """``builtin_interfaces/msg/Time`` for an integer nanosecond timestamp (must be >= 0)."""
    stamp_ns = int(stamp_ns)
    if stamp_ns < 0:
        raise ValueError(f"timestamps must be >= 0 ns, got {stamp_ns}")
    time_cls = typestore.types["builtin_interfaces/msg/Time"]
    return time_cls(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000)


def stamp_to_ns(stamp: Any) -> int:
    """Integer nanoseconds of a ``builtin_interfaces/msg/Time`` (rosbags, rclpy or mcap_ros2)."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _header(typestore: Any, stamp_ns: int, frame_id: str) -> Any:
    header_cls = typestore.types["std_msgs/msg/Header"]
    return header_cls(stamp=ns_to_stamp(typestore, stamp_ns), frame_id=str(frame_id))


def image_msg(
    typestore: Any, image: np.ndarray, stamp_ns: int, frame_id: str, encoding: str = "bgr8"
) -> Any:
    """A rosbags ``sensor_msgs/msg/Image`` holding ``image`` (HxW or HxWxC, C-contiguous copy).

    Args:
        typestore: rosbags typestore.
        image: the pixels; for the default ``bgr8`` a ``uint8`` HxWx3 array (OpenCV order).
        stamp_ns: header stamp in nanoseconds.
        frame_id: header frame id.
        encoding: one of the encodings in ``_ENCODINGS`` (dtype and channels are checked).
    """
    if encoding not in _ENCODINGS:
        raise ValueError(f"unsupported encoding {encoding!r}; expected one of {sorted(_ENCODINGS)}")
    dtype, channels = _ENCODINGS[encoding]
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] != channels:
        raise ValueError(f"{encoding} needs an HxWx{channels} array, got shape {np.shape(image)}")
    if arr.dtype != np.dtype(dtype):
        raise ValueError(f"{encoding} needs dtype {dtype}, got {arr.dtype}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"empty image of shape {arr.shape}")
    arr = np.ascontiguousarray(arr)
    height, width = arr.shape[:2]
    image_cls = typestore.types["sensor_msgs/msg/Image"]
    return image_cls(
        header=_header(typestore, stamp_ns, frame_id),
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=0,
        step=width * channels * arr.dtype.itemsize,
        data=arr.reshape(-1).view(np.uint8),
    )


def compressed_image_msg(typestore: Any, fmt: str, data: bytes, stamp_ns: int,
                         frame_id: str) -> Any:
    """A rosbags ``sensor_msgs/msg/CompressedImage`` (``format`` as image_transport writes it,
    e.g. from :func:`perception2d_ros.io.image_codec.encode_compressed`)."""
    if not data:
        raise ValueError("compressed image data is empty")
    cls = typestore.types[COMPRESSED_IMAGE_TYPE]
    return cls(header=_header(typestore, stamp_ns, frame_id), format=str(fmt),
               data=np.frombuffer(bytes(data), dtype=np.uint8))


def image_to_numpy(msg: Any) -> np.ndarray:
    """Pixels of a ``sensor_msgs/Image`` (rosbags, rclpy or mcap_ros2 object) as an array.

    Returns HxW for one-channel encodings and HxWxC otherwise; honours ``step`` padding.
    """
    encoding = str(msg.encoding)
    if encoding not in _ENCODINGS:
        raise ValueError(f"unsupported encoding {encoding!r}; expected one of {sorted(_ENCODINGS)}")
    dtype, channels = _ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    raw = np.frombuffer(bytes(msg.data) if not isinstance(msg.data, np.ndarray) else msg.data,
                        dtype=np.uint8)
    row_bytes = width * channels * np.dtype(dtype).itemsize
    if step < row_bytes or raw.size < step * height:
        raise ValueError(
            f"image data too short: {raw.size} bytes for {height} rows of step {step} "
            f"({width}x{channels} {dtype})"
        )
    rows = raw[: step * height].reshape(height, step)[:, :row_bytes]
    big = bool(msg.is_bigendian)
    dt = np.dtype(dtype).newbyteorder(">" if big else "<")
    arr = np.ascontiguousarray(rows).view(dt).astype(dtype, copy=False)
    arr = arr.reshape(height, width, channels)
    return arr[:, :, 0] if channels == 1 else arr


def camera_info_msg(typestore: Any, info: Mapping[str, Any], stamp_ns: int, frame_id: str) -> Any:
    """A rosbags ``sensor_msgs/msg/CameraInfo`` from a ``CameraModel.to_camera_info_dict()`` dict.

    Required keys: ``width, height, distortion_model, d, k, r, p``; optional ``binning_x,
    binning_y`` (default 0) and ``roi`` (dict with ``x_offset, y_offset, height, width,
    do_rectify``; default all zero/False).
    """
    missing = [key for key in ("width", "height", "distortion_model", "d", "k", "r", "p")
               if key not in info]
    if missing:
        raise ValueError(f"camera info dict lacks {missing}")
    sizes = {"k": 9, "r": 9, "p": 12}
    arrays = {}
    for key, size in sizes.items():
        arr = np.asarray(info[key], dtype=np.float64).reshape(-1)
        if arr.size != size:
            raise ValueError(f"camera info {key!r} needs {size} values, got {arr.size}")
        arrays[key] = arr
    roi_in = dict(info.get("roi") or {})
    roi_cls = typestore.types["sensor_msgs/msg/RegionOfInterest"]
    roi = roi_cls(
        x_offset=int(roi_in.get("x_offset", 0)),
        y_offset=int(roi_in.get("y_offset", 0)),
        height=int(roi_in.get("height", 0)),
        width=int(roi_in.get("width", 0)),
        do_rectify=bool(roi_in.get("do_rectify", False)),
    )
    info_cls = typestore.types["sensor_msgs/msg/CameraInfo"]
    return info_cls(
        header=_header(typestore, stamp_ns, frame_id),
        height=int(info["height"]),
        width=int(info["width"]),
        distortion_model=str(info["distortion_model"]),
        d=np.asarray(info["d"], dtype=np.float64).reshape(-1),
        k=arrays["k"],
        r=arrays["r"],
        p=arrays["p"],
        binning_x=int(info.get("binning_x", 0) or 0),
        binning_y=int(info.get("binning_y", 0) or 0),
        roi=roi,
    )

