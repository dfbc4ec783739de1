"""The pipeline's frame: :class:`Frame` (one camera frame and every stage's results), the
:class:`Stage` protocol, received-image conversion (:func:`convert_image`) and
:class:`StageUnavailable`. The bottom of pipeline/: model families' stage modules import it,
so it imports nothing from models/ and nothing else of pipeline/."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass
class Frame:
    """One camera frame moving through the pipeline.

    ``image``: HxW or HxWxC array in ``encoding`` (as received). ``camera``: the raw camera's
    CameraModel, or None when the input is already rectified and no calibration is known.
    Stage outputs are attached as attributes; ``timings`` maps stage name → seconds.
    """

    image: np.ndarray
    encoding: str
    stamp_ns: int
    frame_id: str
    camera: Any = None
    rectified: np.ndarray | None = None
    rectified_encoding: str | None = None
    detections: Any = None
    ground: Any = None
    masks: Any = None
    clip: Any = None
    labels: Any = None
    vocabulary_version: int | None = None
    # camera pose in the base frame for this frame (extrinsics.source: tf looks it up at the
    # stamp; None = the detect stage's configured extrinsics); aligned depth (HxW metres,
    # NaN = none, registered to the raw image) or None; 3D objects (geometry.objects3d.Objects3D)
    extrinsics: Any = None
    depth: np.ndarray | None = None
    objects: Any = None
    # camera stream this frame belongs to (camera namespace; keys per-camera state: tracks)
    source: str = ""
    # track id of each detection (strings, Detection2D.id) once a track stage ran
    track_ids: list[str] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # the working image as an HxWx3 uint8 BGR tensor on the models' device, when the
    # pipeline keeps frames there (``detect.device_frames``); None otherwise
    device_bgr: Any = None
    _bgr_cache: np.ndarray | None = None

    @property
    def working_image(self) -> np.ndarray:
        """The image later stages see: rectified when a rectify stage ran, else the input."""
        return self.rectified if self.rectified is not None else self.image

    @property
    def working_encoding(self) -> str:
        return self.rectified_encoding if self.rectified is not None else self.encoding

    def bgr(self) -> np.ndarray:
        """The working image as HxWx3 uint8 BGR (converted once per frame, then cached)."""
        if self._bgr_cache is None:
            img, enc = self.working_image, self.working_encoding
            self._bgr_cache = img if enc == "bgr8" else convert_image(img, enc, "bgr8",
                                                                      "the models")
        return self._bgr_cache


YUV422 = ("yuv422", "yuv422_yuy2", "uyvy", "yuyv")


def convert_image(image: np.ndarray, encoding: str, dst: str, purpose: str) -> np.ndarray:
    """:func:`image_codec.convert` of a received image, with errors naming the message field
    (``image.width`` / ``image.encoding``) so the nodes count and log them under it."""
    from perception2d_ros.io.image_codec import convert

    if encoding in YUV422 and image.shape[1] % 2:
        raise ValueError(f"image.width {image.shape[1]} is odd; {encoding!r} packs pixel "
                         "pairs (4:2:2), so the width must be even")
    try:
        return convert(image, encoding, dst)
    except ValueError as exc:
        raise ValueError(f"image.encoding {encoding!r} cannot be converted to {dst} for "
                         f"{purpose}: {exc}") from None


class Stage(Protocol):
    name: str

    def process(self, frame: Frame) -> None: ...


class StageUnavailable(RuntimeError):
    """A stage was enabled but its model weights are not present."""
