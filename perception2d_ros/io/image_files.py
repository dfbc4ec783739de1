"""Reading image files the way a careful user expects: a truncated JPEG or PNG is an error
(OpenCV decodes the part that arrived, fills the rest with grey and only prints a libjpeg
warning), not a silently half-grey image.

A JPEG must end with its EOI marker (``FF D9``, trailing zero padding allowed); a PNG with
its ``IEND`` chunk. Other formats are checked by decoding only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"


class ImageFileError(ValueError):
    """An image file that cannot be used: missing, unreadable, truncated or not an image."""


def truncation(data: bytes) -> str | None:
    """Why ``data`` (a whole JPEG/PNG file) is truncated, or None (complete or another
    format)."""
    if data[:2] == b"\xff\xd8":
        if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            return "truncated JPEG (no end-of-image marker FFD9)"
    elif data[:8] == _PNG_SIGNATURE:
        if not data.rstrip(b"\x00").endswith(_PNG_IEND):
            return "truncated PNG (no IEND chunk)"
    return None


def read_image(path: str | Path, flags: int | None = None) -> np.ndarray:
    """``cv2.imread`` that raises :class:`ImageFileError` (one line: path, problem, what to
    do) for a missing, empty, truncated or undecodable file instead of returning None or a
    partly grey image. ``flags`` default ``cv2.IMREAD_COLOR``."""
    import cv2

    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ImageFileError(f"cannot read image {p} ({exc.strerror or exc}); check the "
                             "path") from exc
    if not data:
        raise ImageFileError(f"image {p} is empty (0 bytes); skipped")
    why = truncation(data)
    if why:
        raise ImageFileError(f"image {p} is a {why}; skipped — copy or export it again")
    image = cv2.imdecode(np.frombuffer(data, np.uint8),
                         cv2.IMREAD_COLOR if flags is None else flags)
    if image is None:
        raise ImageFileError(f"image {p} is not an image OpenCV can decode; skipped")
    return image
