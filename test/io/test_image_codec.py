"""Tests for perception2d_ros.io.image_codec (sensor_msgs/Image <-> numpy, colour conversion).

Real image: test/data/coco/images/000000397133.jpg (COCO val2017, see test/data/ATTRIBUTION.md).
"""
from __future__ import annotations

import array
import re
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perception2d_ros.io.image_codec import (
    CONVERT_TARGETS,
    ENCODINGS,
    array_to_image_fields,
    bytes_per_pixel,
    convert,
    image_to_array,
    to_bgr8,
)

CONTAINERS = ("bytes", "bytearray", "memoryview", "array", "numpy")


# ----------------------------------------------------------------------------- helpers
def _random_image(encoding: str, h: int, w: int, seed: int = 0) -> np.ndarray:
    channels, dtype = ENCODINGS[encoding]
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    if dtype.kind == "f":
        return (rng.standard_normal(shape) * 1000).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def _wrap(raw: bytes, container: str):
    """The same bytes in the buffer types rclpy / users hand us."""
    if container == "bytes":
        return bytes(raw)
    if container == "bytearray":
        return bytearray(raw)
    if container == "memoryview":
        return memoryview(bytearray(raw))
    if container == "array":
        return array.array("B", raw)
    return np.frombuffer(bytearray(raw), dtype=np.uint8)


def _padded_msg(arr: np.ndarray, encoding: str, pad: int, container: str = "bytearray",
                is_bigendian: bool = False, extra: int = 0) -> SimpleNamespace:
    """An Image-like message with ``pad`` junk bytes after every row and ``extra`` at the end."""
    fields = array_to_image_fields(arr, encoding, is_bigendian=is_bigendian)
    h, row = fields["height"], fields["step"]
    step = row + pad
    buf = np.full((h, step), 0xAB, dtype=np.uint8)
    buf[:, :row] = np.frombuffer(fields["data"], dtype=np.uint8).reshape(h, row)
    raw = buf.tobytes() + b"\xcd" * extra
    return SimpleNamespace(height=h, width=fields["width"], encoding=encoding,
                           is_bigendian=fields["is_bigendian"], step=step,
                           data=_wrap(raw, container))


def _buffer_of(data) -> np.ndarray:
    return data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)


@pytest.fixture(scope="module")
def coco_bgr(data_dir: Path) -> np.ndarray:
    img = cv2.imread(str(data_dir / "coco" / "images" / "000000397133.jpg"))
    assert img is not None and img.shape == (427, 640, 3)
    return img


# ----------------------------------------------------------------------------- table
def test_encoding_table():
    required = ["mono8", "mono16", "bgr8", "rgb8", "bgra8", "rgba8", "8UC1", "8UC3", "16UC1",
                "32FC1", "yuv422", "yuv422_yuy2", "bayer_rggb8", "bayer_bggr8", "bayer_gbrg8",
                "bayer_grbg8"]
    for enc in required:
        assert enc in ENCODINGS
    assert ENCODINGS["bgr8"] == (3, np.dtype(np.uint8))
    assert ENCODINGS["32FC1"] == (1, np.dtype(np.float32))
    assert ENCODINGS["yuv422"] == (2, np.dtype(np.uint8))
    assert bytes_per_pixel("bgr8") == 3
    assert bytes_per_pixel("mono16") == 2
    assert bytes_per_pixel("32FC1") == 4
    assert bytes_per_pixel("yuv422_yuy2") == 2
    assert bytes_per_pixel("64FC3") == 24
    with pytest.raises(ValueError, match="encoding 'jpeg' is not supported"):
        bytes_per_pixel("jpeg")


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_round_trip_every_encoding(encoding):
    arr = _random_image(encoding, 5, 7, seed=len(encoding))
    fields = array_to_image_fields(arr, encoding)
    assert set(fields) == {"height", "width", "encoding", "is_bigendian", "step", "data"}
    assert (fields["height"], fields["width"], fields["encoding"]) == (5, 7, encoding)
    assert fields["step"] == 7 * bytes_per_pixel(encoding)
    assert len(bytes(fields["data"])) == fields["step"] * 5
    back = image_to_array(fields)
    assert back.dtype == arr.dtype and back.dtype.isnative
    np.testing.assert_array_equal(back, arr)
    # Through a bytes payload as rclpy might give it, and big-endian.
    msg = SimpleNamespace(**dict(fields, data=bytes(fields["data"])))
    np.testing.assert_array_equal(image_to_array(msg), arr)
    big = array_to_image_fields(arr, encoding, is_bigendian=True)
    assert big["is_bigendian"] == 1
    np.testing.assert_array_equal(image_to_array(big), arr)


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("encoding", ["bgr8", "mono8", "16UC1", "32FC1", "rgba8", "yuv422"])
def test_step_padding_is_honoured_zero_copy(encoding, container):
    arr = _random_image(encoding, 6, 5, seed=3)
    pad = 8 * ENCODINGS[encoding][1].itemsize  # keeps rows aligned for the dtype
    msg = _padded_msg(arr, encoding, pad=pad, container=container)
    out = image_to_array(msg)
    np.testing.assert_array_equal(out, arr)
    assert np.shares_memory(out, _buffer_of(msg.data)), "expected a view of msg.data"
    if container == "bytes":
        assert not out.flags.writeable  # a view of immutable bytes


def test_data_longer_than_step_height_is_accepted():
    arr = _random_image("bgr8", 4, 3, seed=5)
    msg = _padded_msg(arr, "bgr8", pad=5, extra=17)
    np.testing.assert_array_equal(image_to_array(msg), arr)


def test_unaligned_step_gives_correct_aligned_copy():
    arr = _random_image("mono16", 4, 5, seed=6)
    msg = _padded_msg(arr, "mono16", pad=1)  # odd step: rows not 2-byte aligned
    out = image_to_array(msg)
    np.testing.assert_array_equal(out, arr)
    assert out.flags.aligned


@pytest.mark.parametrize("encoding", ["16UC1", "mono16", "32FC1"])
def test_big_endian_data(encoding):
    arr = _random_image(encoding, 3, 4, seed=7)
    big_bytes = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    msg = SimpleNamespace(height=3, width=4, encoding=encoding, is_bigendian=1,
                          step=4 * arr.itemsize, data=big_bytes)
    out = image_to_array(msg)
    assert out.dtype == arr.dtype and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)
    # The same bytes read as little-endian are different numbers.
    assert not np.array_equal(image_to_array(SimpleNamespace(**dict(vars(msg), is_bigendian=0))), arr)
    fields = array_to_image_fields(arr, encoding, is_bigendian=True)
    assert bytes(fields["data"]) == big_bytes
    # Big-endian padded rows.
    np.testing.assert_array_equal(image_to_array(_padded_msg(arr, encoding, 4, is_bigendian=True)), arr)


def test_array_to_image_fields_zero_copy_and_layouts():
    arr = _random_image("bgr8", 8, 6, seed=8)
    fields = array_to_image_fields(arr, "bgr8")
    assert np.shares_memory(np.frombuffer(fields["data"], np.uint8), arr)
    # Non-contiguous input (a crop) is packed without padding.
    crop = arr[1:5, 2:5]
    fields = array_to_image_fields(crop, "bgr8")
    assert fields["step"] == 9 and fields["width"] == 3 and fields["height"] == 4
    np.testing.assert_array_equal(image_to_array(fields), crop)
    # (H, W, 1) is accepted for single-channel encodings.
    mono = _random_image("mono8", 4, 4)
    np.testing.assert_array_equal(image_to_array(array_to_image_fields(mono[..., None], "mono8")), mono)
    # A big-endian numpy array is written in the requested byte order.
    depth = _random_image("16UC1", 3, 3).astype(">u2")
    np.testing.assert_array_equal(image_to_array(array_to_image_fields(depth, "16UC1")), depth)


# ----------------------------------------------------------------------------- errors
def _msg(**overrides) -> SimpleNamespace:
    base = dict(height=4, width=5, encoding="bgr8", is_bigendian=0, step=15, data=bytes(60))
    base.update(overrides)
    return SimpleNamespace(**base)


@pytest.mark.parametrize(("overrides", "patterns"), [
    ({"encoding": "h264"}, [r"image\.encoding", "'h264'", "not supported"]),
    ({"encoding": ""}, [r"image\.encoding", "''"]),
    ({"data": bytes(59)}, [r"image\.data has 59 bytes, expected step\*height = 60"]),
    ({"step": 14, "data": bytes(56)}, [r"image\.step 14", "width \\* bytes_per_pixel = 5 \\* 3 = 15"]),
    ({"width": 0}, [r"image\.width is 0"]),
    ({"height": 0}, [r"image\.height is 0"]),
    ({"width": -5}, [r"image\.width must be >= 0"]),
    ({"step": 15.0}, [r"image\.step must be an integer"]),
    ({"data": "abc" * 20}, [r"image\.data has unsupported type str"]),
    ({"data": [0] * 59 + [256]}, [r"image\.data must hold bytes"]),
])
def test_decode_errors_name_the_field(overrides, patterns):
    with pytest.raises(ValueError) as info:
        image_to_array(_msg(**overrides))
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))


def test_missing_field():
    msg = _msg()
    del msg.step
    with pytest.raises(ValueError, match=r"image\.step is missing"):
        image_to_array(msg)


def test_absurd_header_fails_fast_without_allocating():
    msg = _msg(height=16000, width=16000, step=48000, data=bytes(100))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"data has 100 bytes, expected step\*height = 768000000"):
            image_to_array(msg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak
    # Sizes that would overflow 32-bit arithmetic are caught the same way.
    with pytest.raises(ValueError, match=r"image\.data has 60 bytes"):
        image_to_array(_msg(height=2**31, width=2**31, step=3 * 2**31, data=bytes(60)))


def test_encode_errors():
    arr = np.zeros((4, 5, 3), np.uint8)
    with pytest.raises(ValueError, match="encoding 'bgr' is not supported"):
        array_to_image_fields(arr, "bgr")
    with pytest.raises(ValueError, match=r"dtype float32 does not match encoding 'bgr8'"):
        array_to_image_fields(arr.astype(np.float32), "bgr8")
    with pytest.raises(ValueError, match=r"shape \(4, 5, 3\) does not match encoding 'mono8'"):
        array_to_image_fields(arr, "mono8")
    with pytest.raises(ValueError, match=r"shape \(4, 5\) does not match encoding 'rgba8'"):
        array_to_image_fields(arr[..., 0], "rgba8")
    with pytest.raises(ValueError, match="must be a numpy array"):
        array_to_image_fields([[1, 2]], "mono8")
    with pytest.raises(ValueError, match="is empty"):
        array_to_image_fields(np.zeros((0, 5), np.uint8), "mono8")


# ----------------------------------------------------------------------------- properties
@settings(max_examples=150, deadline=None)
@given(
    encoding=st.sampled_from(sorted(ENCODINGS)),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    pad=st.integers(0, 9),
    big=st.booleans(),
    container=st.sampled_from(CONTAINERS),
    seed=st.integers(0, 2**16),
)
def test_property_padded_messages_decode_exactly(encoding, h, w, pad, big, container, seed):
    arr = _random_image(encoding, h, w, seed)
    msg = _padded_msg(arr, encoding, pad, container, is_bigendian=big, extra=seed % 3)
    out = image_to_array(msg)
    assert out.shape == arr.shape and out.dtype == arr.dtype
    np.testing.assert_array_equal(out, arr)
    itemsize = arr.dtype.itemsize
    native_order = itemsize == 1 or not big
    if native_order and msg.step % itemsize == 0:
        assert np.shares_memory(out, _buffer_of(msg.data))


# ----------------------------------------------------------------------------- conversions
def _msg_from(arr: np.ndarray, encoding: str) -> SimpleNamespace:
    fields = array_to_image_fields(arr, encoding)
    return SimpleNamespace(**dict(fields, data=bytes(fields["data"])))


def test_real_image_bgr_rgb_mono(coco_bgr):
    msg = _msg_from(coco_bgr, "bgr8")
    decoded = image_to_array(msg)
    np.testing.assert_array_equal(decoded, coco_bgr)
    assert convert(decoded, "bgr8", "bgr8") is decoded  # no-op, no copy
    assert convert(decoded, "8UC3", "bgr8") is decoded
    np.testing.assert_array_equal(to_bgr8(msg), coco_bgr)

    rgb = np.ascontiguousarray(coco_bgr[..., ::-1])
    np.testing.assert_array_equal(to_bgr8(_msg_from(rgb, "rgb8")), coco_bgr)
    np.testing.assert_array_equal(convert(coco_bgr, "bgr8", "rgb8"), rgb)

    gray = convert(coco_bgr, "bgr8", "mono8")
    np.testing.assert_array_equal(gray, cv2.cvtColor(coco_bgr, cv2.COLOR_BGR2GRAY))
    np.testing.assert_array_equal(convert(rgb, "rgb8", "mono8"), gray)
    grey_bgr = to_bgr8(_msg_from(gray, "mono8"))
    assert grey_bgr.shape == coco_bgr.shape
    for c in range(3):
        np.testing.assert_array_equal(grey_bgr[..., c], gray)

    bgra = cv2.cvtColor(coco_bgr, cv2.COLOR_BGR2BGRA)
    rgba = cv2.cvtColor(coco_bgr, cv2.COLOR_BGR2RGBA)
    np.testing.assert_array_equal(to_bgr8(_msg_from(bgra, "bgra8")), coco_bgr)
    np.testing.assert_array_equal(to_bgr8(_msg_from(rgba, "rgba8")), coco_bgr)
    np.testing.assert_array_equal(convert(rgba, "rgba8", "rgb8"), rgb)


@pytest.mark.parametrize(("encoding", "to_yuv", "from_yuv"), [
    ("yuv422", cv2.COLOR_BGR2YUV_UYVY, cv2.COLOR_YUV2BGR_UYVY),
    ("yuv422_yuy2", cv2.COLOR_BGR2YUV_YUY2, cv2.COLOR_YUV2BGR_YUY2),
])
def test_real_image_yuv422(coco_bgr, encoding, to_yuv, from_yuv):
    yuv = cv2.cvtColor(coco_bgr, to_yuv)
    assert yuv.shape == (427, 640, 2)
    msg = _msg_from(yuv, encoding)
    assert msg.step == 640 * 2
    raw = image_to_array(msg)
    np.testing.assert_array_equal(raw, yuv)  # returned raw, (H, W, 2)
    # Byte order: UYVY starts with a chroma byte, YUY2 with a luma byte.
    luma = convert(raw, encoding, "mono8")
    first_luma_index = 1 if encoding == "yuv422" else 0
    np.testing.assert_array_equal(luma[0, 0], yuv[0, 0, first_luma_index])
    bgr = to_bgr8(msg)
    np.testing.assert_array_equal(bgr, cv2.cvtColor(yuv, from_yuv))
    # Round trip against the original: chroma is subsampled, so allow a few levels.
    diff = np.abs(bgr.astype(np.int16) - coco_bgr)
    assert diff.mean() < 2.0, diff.mean()
    smooth = cv2.GaussianBlur(coco_bgr, (0, 0), 2)
    diff = np.abs(convert(cv2.cvtColor(smooth, to_yuv), encoding, "bgr8").astype(np.int16) - smooth)
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4, (diff.mean(), np.percentile(diff, 99))
    np.testing.assert_array_equal(luma, yuv[..., first_luma_index])  # mono8 = the Y samples
    with pytest.raises(ValueError, match="width 639 .* must be even"):
        convert(np.ascontiguousarray(raw[:, :639]), encoding, "bgr8")


def _mosaic(bgr: np.ndarray, pattern: str) -> np.ndarray:
    """Bayer mosaic with ``pattern`` (e.g. 'rggb': R at (0,0), G at (0,1) and (1,0), B at (1,1))."""
    channel = {"b": 0, "g": 1, "r": 2}
    out = np.empty(bgr.shape[:2], bgr.dtype)
    for letter, (dy, dx) in zip(pattern, [(0, 0), (0, 1), (1, 0), (1, 1)]):
        out[dy::2, dx::2] = bgr[dy::2, dx::2, channel[letter]]
    return out


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
def test_real_image_bayer_demosaic(coco_bgr, pattern):
    mosaic = _mosaic(coco_bgr, pattern)
    encoding = f"bayer_{pattern}8"
    msg = _msg_from(mosaic, encoding)
    np.testing.assert_array_equal(image_to_array(msg), mosaic)  # raw HxW
    errors = {}
    for guess in ("rggb", "bggr", "gbrg", "grbg"):
        bgr = convert(mosaic, f"bayer_{guess}8", "bgr8")
        assert bgr.shape == coco_bgr.shape and bgr.dtype == np.uint8
        errors[guess] = np.abs(bgr.astype(np.int16) - coco_bgr)[2:-2, 2:-2].mean()
    assert errors[pattern] < 6.0, errors
    assert all(errors[pattern] * 2.5 < e for g, e in errors.items() if g != pattern), errors
    np.testing.assert_array_equal(to_bgr8(msg), convert(mosaic, encoding, "bgr8"))
    gray = convert(mosaic, encoding, "mono8")
    assert np.abs(gray.astype(np.int16) - cv2.cvtColor(coco_bgr, cv2.COLOR_BGR2GRAY))[2:-2, 2:-2].mean() < 6.0
    # 16-bit Bayer: demosaiced then scaled like the 8-bit one.
    bgr16 = convert(mosaic.astype(np.uint16) * 257, f"bayer_{pattern}16", "bgr8")
    np.testing.assert_array_equal(bgr16, convert(mosaic, encoding, "bgr8"))


def test_sixteen_bit_scaling():
    values = np.array([[0, 257, 65535, 32896, 32767, 128, 129]], dtype=np.uint16)
    expected = np.array([[0, 1, 255, 128, 127, 0, 1]], dtype=np.uint8)  # round(v * 255 / 65535)
    np.testing.assert_array_equal(convert(values, "mono16", "mono8"), expected)
    np.testing.assert_array_equal(convert(values, "16UC1", "mono8"), expected)
    bgr = to_bgr8(_msg_from(values, "mono16"))
    assert bgr.shape == (1, 7, 3)
    np.testing.assert_array_equal(bgr[..., 1], expected)
    rgb16 = np.stack([values, values // 2, values // 4], axis=-1).astype(np.uint16)
    out = convert(rgb16, "rgb16", "bgr8")
    np.testing.assert_array_equal(out[..., 2], expected)  # R channel


def test_conversion_errors():
    img = np.zeros((4, 6, 3), np.uint8)
    with pytest.raises(ValueError, match="dst_encoding 'bgra8' is not supported"):
        convert(img, "bgr8", "bgra8")
    with pytest.raises(ValueError, match="src_encoding '32FC1' is not a colour or mono image"):
        convert(np.zeros((4, 6), np.float32), "32FC1", "bgr8")
    with pytest.raises(ValueError, match="src_encoding 'bgr9' is not supported"):
        convert(img, "bgr9", "bgr8")
    with pytest.raises(ValueError, match=r"shape \(4, 6, 3\) does not match encoding 'mono8'"):
        convert(img, "mono8", "bgr8")
    with pytest.raises(ValueError, match="encoding is required"):
        to_bgr8(img)
    with pytest.raises(ValueError, match=r"does not match image\.encoding 'bgr8'"):
        to_bgr8(_msg_from(img, "bgr8"), "rgb8")
    assert set(CONVERT_TARGETS) == {"bgr8", "rgb8", "mono8"}
