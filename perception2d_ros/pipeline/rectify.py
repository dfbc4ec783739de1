"""The rectify stage: undistort the received image with maps cached per calibration, on the
host (cv2, into a reusable message buffer) or on the models' device (``detect.device_frames``).
:data:`INTERPOLATIONS` maps the ``interpolation`` parameter to cv2's codes."""
from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from perception2d_ros.io.image_codec import message_buffer_array, message_buffer_of
from perception2d_ros.pipeline.frame import YUV422, Frame, convert_image

INTERPOLATIONS = {"nearest": 0, "linear": 1, "cubic": 2, "area": 3, "lanczos": 4}


class RectifyStage:
    """Rectify with cached maps; maps are rebuilt only when the calibration changes."""

    name = "rectify"

    def __init__(self, interpolation: int | None = None,
                 output_encoding: str = "passthrough", device_frames: Any = None) -> None:
        import cv2

        self.interpolation = cv2.INTER_LINEAR if interpolation is None else interpolation
        # last output, reused when no one else holds it; the refcount of a sole owner is
        # measured through the same call so it holds on any CPython version
        # its memory is an array.array that an Image message takes as ``data`` with no copy
        self._out: np.ndarray = message_buffer_array((1,), np.uint8)
        self._sole_refs = self._out_refs()
        self.output_encoding = output_encoding
        self.device_frames = device_frames   # engines.device.DeviceFrames: rectify on the device

    def _out_refs(self) -> tuple[int, int]:
        # the array and its buffer: a message that took the buffer holds only the latter
        return sys.getrefcount(self._out), sys.getrefcount(message_buffer_of(self._out))

    def process(self, frame: Frame) -> None:
        if frame.camera is None:
            raise ValueError("camera_info.k: no calibration for this frame; rectify needs one")
        t0 = time.perf_counter()
        image, encoding = frame.image, frame.encoding
        if encoding.startswith("bayer_") or encoding in YUV422:  # demosaic / unpack first
            image, encoding = convert_image(image, encoding, "bgr8", "rectification"), "bgr8"
        cam = frame.camera
        if (image.shape[1], image.shape[0]) != tuple(cam.image_size):
            raise ValueError(
                f"camera_info.size {cam.image_size[0]}x{cam.image_size[1]} does not match image "
                f"{image.shape[1]}x{image.shape[0]}")
        dev = self.device_frames
        if dev is not None and encoding in ("bgr8", "rgb8", "mono8") and \
                self.interpolation in (0, 1):
            # upload once; rectify on the device; the host copy is what gets published
            from perception2d_ros.engines.device import to_bgr

            rect = dev.rectify(dev.upload(image), cam, self.interpolation)
            frame.device_bgr = to_bgr(rect, encoding)
            frame.rectified = image if cam.is_identity else dev.download(rect)
        elif cam.is_identity:
            frame.rectified = image
        else:
            # Reuse the previous output only when nothing else holds it any more (a frame,
            # message or view still holding it gets a fresh array): a fresh 2.7 MB array per
            # 720p frame costs ~1 ms of page faults, a quarter of the remap itself.
            if (self._out.shape != image.shape or self._out.dtype != image.dtype
                    or self._out_refs() != self._sole_refs):
                self._out = message_buffer_array(image.shape, image.dtype)
            frame.rectified = cam.rectify(image, interpolation=self.interpolation, out=self._out)
        if self.output_encoding not in ("passthrough", encoding):
            frame.rectified = convert_image(frame.rectified, encoding, self.output_encoding,
                                            f"output_encoding {self.output_encoding}")
            encoding = self.output_encoding
        frame.rectified_encoding = encoding
        frame.timings[self.name] = time.perf_counter() - t0
