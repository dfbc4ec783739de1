"""Make the README picture (docs/demo.png) from a `make demo` output frame.

    python scripts/demo_picture.py [demo_output/annotated/frame_010.png] [docs/demo.png]
"""
from __future__ import annotations

import sys

import cv2


def main(src: str = "demo_output/annotated/frame_010.png", dst: str = "docs/demo.png",
         width: int = 960) -> None:
    img = cv2.imread(src)
    if img is None:
        sys.exit(f"cannot read {src}: run `make demo` first")
    small = cv2.resize(img, (width, round(img.shape[0] * width / img.shape[1])),
                       interpolation=cv2.INTER_AREA)
    cv2.imwrite(dst, small, [cv2.IMWRITE_PNG_COMPRESSION, 9])


if __name__ == "__main__":
    main(*sys.argv[1:])
