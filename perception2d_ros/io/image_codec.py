"""sensor_msgs/Image <-> numpy, and colour conversion for model input (replaces cv_bridge);
sensor_msgs/CompressedImage (image_transport's ``compressed`` format) <-> numpy.

ROS-free: works on any object (or mapping) with the ``sensor_msgs/Image`` fields
``height, width, encoding, is_bigendian, step, data``.

Array conventions: single-channel encodings decode to ``(H, W)``, multi-channel ones to
``(H, W, C)``, with the dtype in :data:`ENCODINGS`. ``yuv422`` (UYVY byte order) and
``yuv422_yuy2`` (YUYV) decode raw as ``(H, W, 2)`` uint8 (use :func:`convert` to get colour);
Bayer encodings decode raw as ``(H, W)`` mosaics.

Decoding is zero-copy whenever possible: the returned array is a view of ``msg.data``
(honouring ``step`` padding) so it is read-only when the data is ``bytes``, and changes if
the message buffer is modified. A copy is made only for byte order swaps (``is_bigendian``
differs from the host) or when the rows are not aligned for the dtype.

Message consistency (as cv_bridge checks; errors are ``ValueError`` naming ``image.<field>``):
``width``/``height`` > 0, ``step >= width * bytes_per_pixel``, ``len(data) >= step * height``.
Data longer than ``step * height`` is accepted and the excess ignored (like Python
cv_bridge's ``imgmsg_to_cv2``; the C++ cv_bridge rejects it).
"""
from __future__ import annotations

import array as _array
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

__all__ = [
    "ENCODINGS",
    "bytes_per_pixel",
    "image_to_array",
    "array_to_image_fields",
    "convert",
    "to_bgr8",
    "CONVERT_TARGETS",
    "COMPRESSED_CODECS",
    "decode_compressed",
    "encode_compressed",
]


def _table() -> dict[str, tuple[int, np.dtype]]:
    u8, u16 = np.dtype(np.uint8), np.dtype(np.uint16)
    table: dict[str, tuple[int, np.dtype]] = {
        "mono8": (1, u8), "mono16": (1, u16),
        "bgr8": (3, u8), "rgb8": (3, u8), "bgra8": (4, u8), "rgba8": (4, u8),
        "bgr16": (3, u16), "rgb16": (3, u16), "bgra16": (4, u16), "rgba16": (4, u16),
        "yuv422": (2, u8), "yuv422_yuy2": (2, u8),
        "uyvy": (2, u8), "yuyv": (2, u8),  # newer sensor_msgs names of the two above
    }
    for pattern in ("rggb", "bggr", "gbrg", "grbg"):
        table[f"bayer_{pattern}8"] = (1, u8)
        table[f"bayer_{pattern}16"] = (1, u16)
    for depth, dt in (("8U", np.uint8), ("8S", np.int8), ("16U", np.uint16), ("16S", np.int16),
                      ("32S", np.int32), ("32F", np.float32), ("64F", np.float64)):
        for c in (1, 2, 3, 4):
            table[f"{depth}C{c}"] = (c, np.dtype(dt))
    return table


#: encoding -> (channels, dtype). dtypes are native byte order.
ENCODINGS: dict[str, tuple[int, np.dtype]] = _table()

#: Encodings :func:`convert` can produce.
CONVERT_TARGETS = ("bgr8", "rgb8", "mono8")

# Colour layout and bit depth of the encodings :func:`convert` understands. 8UC1/8UC3/8UC4/
# 16UC1 are read as mono8/bgr8/bgra8/mono16 (OpenCV's channel order).
_LAYOUT: dict[str, tuple[str, int]] = {
    "mono8": ("mono", 8), "8UC1": ("mono", 8), "mono16": ("mono", 16), "16UC1": ("mono", 16),
    "bgr8": ("bgr", 8), "8UC3": ("bgr", 8), "rgb8": ("rgb", 8),
    "bgra8": ("bgra", 8), "8UC4": ("bgra", 8), "rgba8": ("rgba", 8),
    "bgr16": ("bgr", 16), "rgb16": ("rgb", 16), "bgra16": ("bgra", 16), "rgba16": ("rgba", 16),
    "yuv422": ("uyvy", 8), "uyvy": ("uyvy", 8), "yuv422_yuy2": ("yuyv", 8), "yuyv": ("yuyv", 8),
}
for _p in ("rggb", "bggr", "gbrg", "grbg"):
    _LAYOUT[f"bayer_{_p}8"] = (f"bayer_{_p}", 8)
    _LAYOUT[f"bayer_{_p}16"] = (f"bayer_{_p}", 16)

_DST_LAYOUT = {"bgr8": "bgr", "rgb8": "rgb", "mono8": "mono"}
_DST_SUFFIX = {"bgr": "BGR", "rgb": "RGB", "mono": "GRAY"}
_SRC_PREFIX = {"mono": "GRAY", "bgr": "BGR", "rgb": "RGB", "bgra": "BGRA", "rgba": "RGBA"}
_SCALE_16_TO_8 = 255.0 / 65535.0  # cv_bridge's 16 -> 8 bit scaling


def _cv_code(src_layout: str, dst_layout: str) -> int | None:
    """cv2.COLOR_* code from a source layout to bgr/rgb/mono (None = nothing to do)."""
    if src_layout == dst_layout:
        return None
    suffix = _DST_SUFFIX[dst_layout]
    if src_layout.startswith("bayer_"):
        # OpenCV >= 4.7 names Bayer codes by the sensor pattern (COLOR_BayerRGGB2BGR is the
        # old COLOR_BayerBG2BGR, the code cv_bridge uses for bayer_rggb8).
        return getattr(cv2, f"COLOR_Bayer{src_layout[6:].upper()}2{suffix}")
    if src_layout in ("uyvy", "yuyv"):
        return getattr(cv2, f"COLOR_YUV2{suffix}_{'UYVY' if src_layout == 'uyvy' else 'YUY2'}")
    return getattr(cv2, f"COLOR_{_SRC_PREFIX[src_layout]}2{suffix}")


def bytes_per_pixel(encoding: str) -> int:
    """Bytes per pixel of ``encoding`` (channels * dtype itemsize); ValueError if unknown."""
    channels, dtype = _lookup(encoding)
    return channels * dtype.itemsize


def _lookup(encoding: Any, field: str = "image.encoding") -> tuple[int, np.dtype]:
    try:
        return ENCODINGS[encoding]
    except (KeyError, TypeError):
        raise ValueError(
            f"{field} {encoding!r} is not supported; supported encodings: {sorted(ENCODINGS)}"
        ) from None


def _field(msg: Any, name: str) -> Any:
    if isinstance(msg, Mapping):
        if name in msg:
            return msg[name]
    elif hasattr(msg, name):
        return getattr(msg, name)
    raise ValueError(f"image.{name} is missing (not a sensor_msgs/Image-like object)")


def _uint_field(msg: Any, name: str) -> int:
    value = _field(msg, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"image.{name} must be an integer, got {value!r}")
    value = int(value)
    if value < 0:
        raise ValueError(f"image.{name} must be >= 0, got {value}")
    return value


def _byte_view(data: Any) -> np.ndarray:
    """1-D uint8 view of a message's data buffer (copy only for lists / non-contiguous)."""
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        return data.reshape(-1).view(np.uint8)
    if isinstance(data, (bytes, bytearray, memoryview, _array.array)):
        mv = memoryview(data)
        if not mv.c_contiguous:
            mv = memoryview(mv.tobytes())
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        return np.frombuffer(mv, dtype=np.uint8)
    if isinstance(data, (list, tuple)):
        try:
            return np.asarray(data, dtype=np.uint8)
        except (OverflowError, ValueError, TypeError) as exc:
            raise ValueError(f"image.data must hold bytes 0..255: {exc}") from None
    raise ValueError(
        f"image.data has unsupported type {type(data).__name__}; expected bytes, bytearray, "
        "memoryview, array.array or numpy array"
    )


def image_to_array(msg: Any) -> np.ndarray:
    """Decode a ``sensor_msgs/Image``-like object (attributes or mapping) to a numpy array.

    Returns ``(H, W)`` for single-channel encodings or ``(H, W, C)``, dtype per
    :data:`ENCODINGS` in native byte order; a zero-copy view of ``msg.data`` where the
    layout allows (see module docstring). Raw Bayer / YUV422 data is returned undecoded.

    Raises:
        ValueError: naming the field: unknown ``encoding``, ``width``/``height`` of 0,
            ``step`` < ``width * bytes_per_pixel``, ``data`` shorter than ``step * height``.
            These checks run before anything is allocated.
    """
    encoding = _field(msg, "encoding")
    channels, dtype = _lookup(encoding)
    height = _uint_field(msg, "height")
    width = _uint_field(msg, "width")
    step = _uint_field(msg, "step")
    if width == 0:
        raise ValueError("image.width is 0")
    if height == 0:
        raise ValueError("image.height is 0")
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise ValueError(
            f"image.step {step} is smaller than width * bytes_per_pixel = {width} * "
            f"{channels * dtype.itemsize} = {row_bytes} for {encoding!r}"
        )
    data = _field(msg, "data")
    if isinstance(data, np.ndarray):
        n_bytes = data.nbytes
    elif isinstance(data, (list, tuple)):
        n_bytes = len(data)
    else:
        try:
            n_bytes = memoryview(data).nbytes
        except TypeError:
            raise ValueError(
                f"image.data has unsupported type {type(data).__name__}; expected bytes, "
                "bytearray, memoryview, array.array or numpy array"
            ) from None
    expected = step * height
    if n_bytes < expected:
        raise ValueError(
            f"image.data has {n_bytes} bytes, expected step*height = {expected} "
            f"(step={step}, height={height})"
        )

    buf = _byte_view(data)[:expected]
    rows = buf.reshape(height, step)[:, :row_bytes]
    if dtype.itemsize > 1:
        big = bool(_field(msg, "is_bigendian"))
        msg_dtype = dtype.newbyteorder(">" if big else "<")
        pixels = rows.view(msg_dtype)
        if not msg_dtype.isnative:
            pixels = pixels.astype(dtype)  # byte swap (copy)
        elif not pixels.flags.aligned:
            pixels = pixels.copy()  # odd step or buffer address: copy to aligned storage
    else:
        pixels = rows if dtype == np.uint8 else rows.view(dtype)  # 8SC*: int8
    if channels == 1:
        return pixels
    return pixels.reshape(height, width, channels)


def _check_array(array: Any, encoding: str, field: str = "array") -> tuple[int, np.dtype]:
    channels, dtype = _lookup(encoding, "encoding")
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{field} must be a numpy array, got {type(array).__name__}")
    if array.dtype.newbyteorder("=") != dtype:
        raise ValueError(
            f"{field} dtype {array.dtype} does not match encoding {encoding!r} ({dtype})"
        )
    ok_shape = (
        (array.ndim == 2 and channels == 1)
        or (array.ndim == 3 and array.shape[2] == channels)
    )
    if not ok_shape:
        want = "(H, W)" if channels == 1 else f"(H, W, {channels})"
        raise ValueError(
            f"{field} shape {array.shape} does not match encoding {encoding!r}: {want}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{field} shape {array.shape} is empty")
    return channels, dtype


def array_to_image_fields(
    array: np.ndarray, encoding: str, *, is_bigendian: bool = False
) -> dict[str, Any]:
    """Fields of a ``sensor_msgs/Image`` for ``array``: ``height, width, encoding,
    is_bigendian (0/1), step (= width * bytes_per_pixel, no padding), data``.

    ``array`` must be ``(H, W)`` (or ``(H, W, 1)``) for single-channel encodings and
    ``(H, W, C)`` otherwise, with the encoding's dtype (any byte order). ``data`` is a
    flat uint8 ``memoryview``: zero-copy of ``array`` when it is already C-contiguous in the
    requested byte order (so do not modify ``array`` until the message is sent), otherwise
    of a fresh copy. For rclpy, ``a = array.array('B'); a.frombytes(data); msg.data = a`` is
    the fastest way to fill ``msg.data`` (one memcpy, no per-element checks).

    Raises:
        ValueError: unknown encoding, or shape/dtype not matching it.
    """
    channels, dtype = _check_array(array, encoding)
    target = dtype.newbyteorder(">" if is_bigendian else "<") if dtype.itemsize > 1 else dtype
    arr = array if array.dtype == target else array.astype(target)
    arr = np.ascontiguousarray(arr)
    height, width = arr.shape[:2]
    return {
        "height": int(height),
        "width": int(width),
        "encoding": encoding,
        "is_bigendian": int(bool(is_bigendian)),
        "step": int(width * channels * dtype.itemsize),
        "data": memoryview(arr.reshape(-1).view(np.uint8)),
    }


def message_buffer_array(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A C-contiguous array whose memory is an ``array.array('B')``: a ``sensor_msgs/Image``
    built from it (:func:`message_buffer_of`) takes that buffer as ``data`` with no copy.

    Writing a result straight into such an array (``cv2.remap(..., dst=a)``) saves the one
    copy an image message otherwise costs (~0.2 ms per 720p bgr8 frame).
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buf = _array.array("B", bytes(nbytes))
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def message_buffer_of(array: np.ndarray) -> "_array.array | None":
    """The ``array.array('B')`` behind ``array`` when ``array`` is exactly all of it (as made
    by :func:`message_buffer_array`, little-endian or single-byte data), else None."""
    if not array.flags.c_contiguous or (array.dtype.itemsize > 1
                                        and array.dtype.byteorder == ">"):
        return None
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    obj = base.obj if isinstance(base, memoryview) else base
    if isinstance(obj, _array.array) and obj.typecode == "B" and len(obj) == array.nbytes \
            and array.ctypes.data == obj.buffer_info()[0]:
        return obj
    return None


def convert(array: np.ndarray, src_encoding: str, dst_encoding: str) -> np.ndarray:
    """Convert a decoded image to ``bgr8``, ``rgb8`` or ``mono8`` (model input).

    Sources: mono8/16, bgr/rgb/bgra/rgba 8/16, 8UC1/8UC3/8UC4/16UC1 (read as mono8, bgr8,
    bgra8, mono16), Bayer 8/16 (demosaiced with ``cv2.cvtColor`` bilinear, the pattern named
    by the encoding), yuv422/uyvy and yuv422_yuy2/yuyv (``COLOR_YUV2*_UYVY`` / ``_YUY2``, width
    must be even). 16-bit data is scaled to 8 bits by 255/65535 with rounding, as cv_bridge
    does (a mono16 value v becomes round(v * 255 / 65535)). Float and signed encodings are not
    colour images and are rejected.

    If no conversion is needed (same layout and depth, e.g. bgr8 -> bgr8 or 8UC3 -> bgr8)
    ``array`` itself is returned (no copy).

    Raises:
        ValueError: naming ``src_encoding`` / ``dst_encoding`` / ``array`` / ``width``.
    """
    if dst_encoding not in _DST_LAYOUT:
        raise ValueError(
            f"dst_encoding {dst_encoding!r} is not supported; "
            f"expected one of {list(CONVERT_TARGETS)}"
        )
    if src_encoding not in ENCODINGS:
        _lookup(src_encoding, "src_encoding")
    if src_encoding not in _LAYOUT:
        raise ValueError(
            f"src_encoding {src_encoding!r} is not a colour or mono image; cannot convert it "
            f"to {dst_encoding!r}"
        )
    _check_array(array, src_encoding)
    layout, depth = _LAYOUT[src_encoding]
    dst_layout = _DST_LAYOUT[dst_encoding]
    if layout in ("uyvy", "yuyv") and array.shape[1] % 2:
        raise ValueError(f"width {array.shape[1]} of a {src_encoding!r} image must be even")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    code = _cv_code(layout, dst_layout)
    out = array
    if code is not None:
        try:
            out = cv2.cvtColor(array, code)
        except cv2.error as exc:
            raise ValueError(
                f"cannot convert {src_encoding!r} array of shape {array.shape} to "
                f"{dst_encoding!r}: {exc}"
            ) from None
    if depth == 16:
        out = cv2.convertScaleAbs(out, alpha=_SCALE_16_TO_8)
    if out.ndim == 3 and out.shape[2] == 1:
        out = out[:, :, 0]
    return out


def to_bgr8(msg_like_or_array: Any, encoding: str | None = None) -> np.ndarray:
    """HxWx3 uint8 BGR from an Image-like message or a decoded array.

    For an array, ``encoding`` is required. For a message, ``encoding`` defaults to (and
    must equal, if given) the message's. See :func:`convert` for the conversions.
    """
    if isinstance(msg_like_or_array, np.ndarray):
        if encoding is None:
            raise ValueError("encoding is required when converting an array")
        return convert(msg_like_or_array, encoding, "bgr8")
    msg_encoding = _field(msg_like_or_array, "encoding")
    if encoding is not None and encoding != msg_encoding:
        raise ValueError(
            f"encoding {encoding!r} does not match image.encoding {msg_encoding!r}"
        )
    return convert(image_to_array(msg_like_or_array), msg_encoding, "bgr8")



# --------------------------------------------------------------------------------------------
# sensor_msgs/CompressedImage (image_transport's ``compressed`` transport)
# --------------------------------------------------------------------------------------------
#: Codecs :func:`encode_compressed` writes (``format`` strings as image_transport writes them).
COMPRESSED_CODECS = ("jpeg", "png")


def _compressed_layout(fmt: str) -> tuple[str, str]:
    """``(codec, channel order of the decoded pixels)`` from a CompressedImage ``format``.

    image_transport's compressed publisher writes ``"<encoding>; <codec> compressed <target>"``
    (e.g. ``"bgr8; jpeg compressed bgr8"``, ``"rgb8; png compressed rgb8"``); older
    publishers and many camera drivers write just ``"jpeg"`` / ``"png"`` (pixels in BGR order
    once decoded, as OpenCV reads any image file). ``target`` names the channel order the
    decoded pixels are in.
    """
    text = str(fmt).strip().lower()
    if "compresseddepth" in text:
        raise ValueError(
            f"image.format {fmt!r} is the compressedDepth transport (depth images), not "
            "supported as camera input; subscribe to the camera's colour image")
    codec = text.split(";", 1)[1].strip().split(" ", 1)[0] if ";" in text else text
    order = "rgb" if "compressed rgb" in text else "bgr"
    return codec or "unknown", order


def decode_compressed(fmt: str, data: Any) -> tuple[np.ndarray, str]:
    """Decode the ``data`` of a ``sensor_msgs/CompressedImage`` with ``cv2.imdecode``.

    Args:
        fmt: the message's ``format`` (``"jpeg"``, ``"bgr8; jpeg compressed bgr8"``, …).
        data: the compressed bytes (bytes, array.array, memoryview or uint8 numpy array).

    Returns:
        ``(array, encoding)``: 8-bit images as ``bgr8`` (H, W, 3) or ``mono8`` (H, W) —
        colour is always returned in BGR order, whatever order the format names; 16-bit PNGs
        as ``bgr16`` / ``mono16``. The pixels are decoded unchanged (``IMREAD_UNCHANGED``,
        no EXIF rotation), as image_transport's compressed subscriber does.

    Raises:
        ValueError: naming ``image.format`` / ``image.data``: an empty or undecodable buffer,
            a truncated JPEG (no end-of-image marker), or the compressedDepth transport.
    """
    codec, order = _compressed_layout(fmt)
    try:
        buf = _byte_view(data)
    except ValueError as exc:
        raise ValueError(f"image.data of a CompressedImage ({fmt!r}): {exc}") from None
    if buf.size == 0:
        raise ValueError(f"image.data is empty (CompressedImage format {fmt!r})")
    if buf.size >= 2 and buf[0] == 0xFF and buf[1] == 0xD8:  # a JPEG stream
        tail = buf[-64:]
        nonzero = np.flatnonzero(tail)  # zero padding after the marker is harmless
        end = buf.size - tail.size + int(nonzero[-1]) + 1 if nonzero.size else 0
        if end < 2 or not (buf[end - 2] == 0xFF and buf[end - 1] == 0xD9):
            raise ValueError(f"image.format {fmt!r}: truncated JPEG ({buf.size} bytes, no "
                             "end-of-image marker)")
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        image = None
        reason = " ".join(str(exc).split())
    else:
        reason = "not a valid image stream"
    if image is None:
        raise ValueError(f"image.format {fmt!r}: cannot decode {buf.size} bytes as {codec} "
                         f"({reason})")
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"image.format {fmt!r}: decoded to {image.dtype}, expected 8 or 16 "
                         "bit pixels")
    bits = 8 if image.dtype == np.uint8 else 16
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return image, f"mono{bits}"
    channels = image.shape[2]
    if channels == 3 and order == "rgb":
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    elif channels == 4:
        image = cv2.cvtColor(image, cv2.COLOR_RGBA2BGR if order == "rgb" else cv2.COLOR_BGRA2BGR)
    elif channels != 3:
        raise ValueError(f"image.format {fmt!r}: decoded to {channels} channels")
    return image, f"bgr{bits}"


def encode_compressed(image: np.ndarray, codec: str = "jpeg", *, jpeg_quality: int = 95,
                      png_level: int = 3) -> tuple[str, bytes]:
    """Compress a ``bgr8`` (H, W, 3) or ``mono8`` (H, W) image as image_transport's compressed
    publisher does (defaults: JPEG quality 95, PNG level 3).

    Returns:
        ``(format, data)`` with ``format`` as that publisher writes it, e.g.
        ``"bgr8; jpeg compressed bgr8"`` or ``"mono8; png compressed mono8"``.
    """
    if codec not in COMPRESSED_CODECS:
        raise ValueError(f"codec {codec!r} is not supported; expected one of "
                         f"{list(COMPRESSED_CODECS)}")
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"expected a bgr8 (H, W, 3) or mono8 (H, W) uint8 image, got "
                         f"{arr.dtype} {arr.shape}")
    if not 0 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg quality must be in 0..100, got {jpeg_quality}")
    encoding = "mono8" if arr.ndim == 2 else "bgr8"
    if codec == "jpeg":
        ok, buf = cv2.imencode(".jpg", arr, [int(cv2.IMWRITE_JPEG_QUALITY), int(jpeg_quality)])
    else:
        ok, buf = cv2.imencode(".png", arr, [int(cv2.IMWRITE_PNG_COMPRESSION), int(png_level)])
    if not ok:
        raise ValueError(f"cv2.imencode failed for a {encoding} {arr.shape} image as {codec}")
    return f"{encoding}; {codec} compressed {encoding}", buf.tobytes()
