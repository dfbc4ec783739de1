"""``perception2d rectify``: undistort/rectify image files with a camera_info YAML.

Each ``IMAGE`` is written to ``OUTDIR`` under its own file name (same format, chosen by the
extension), rectified with ``CameraModel.rectify``.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def rectify_files(
    camera_info: str | Path,
    images: Sequence[str | Path],
    outdir: str | Path,
    *,
    overwrite: bool = True,
    jpeg_quality: int = 95,
    progress: bool = True,
) -> list[Path]:
    """Rectify ``images`` into ``outdir`` (created if needed); returns the written paths.

    Raises:
        ValueError: no images, duplicate file names, an image that cannot be read or whose
            size differs from the calibration, or an output that would replace its input.
        FileNotFoundError: the YAML or an image does not exist.
        FileExistsError: an output exists and ``overwrite`` is False.
    """
    import cv2
    from tqdm import tqdm

    from perception2d_ros.geometry.camera import CameraModel
    from perception2d_ros.io.image_files import read_image

    if not images:
        raise ValueError("no images given")
    if not 0 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg quality must be in 0..100, got {jpeg_quality}")
    if not Path(camera_info).is_file():
        raise FileNotFoundError(f"camera info YAML {camera_info} does not exist")
    sources = [Path(p) for p in images]
    names: dict[str, Path] = {}
    for src in sources:
        if not src.is_file():
            raise FileNotFoundError(f"image {src} does not exist")
        if src.name in names:
            raise ValueError(f"two inputs share the file name {src.name}: {names[src.name]} "
                             f"and {src}; outputs would overwrite each other")
        names[src.name] = src
    out_root = Path(outdir)
    if out_root.exists() and not out_root.is_dir():
        raise NotADirectoryError(f"output {out_root} exists and is not a directory")
    targets = [out_root / src.name for src in sources]
    for src, dst in zip(sources, targets):
        if dst.exists() and dst.resolve() == src.resolve():
            raise ValueError(f"output {dst} would replace its input; choose another -o")
        if dst.exists() and not overwrite:
            raise FileExistsError(f"{dst} exists already")

    model = CameraModel.from_yaml(camera_info)
    info = model.to_camera_info_dict()
    size = getattr(model, "image_size", None) or (info["width"], info["height"])
    size = (int(size[0]), int(size[1]))
    out_root.mkdir(parents=True, exist_ok=True)
    params = [int(cv2.IMWRITE_JPEG_QUALITY), int(jpeg_quality)]
    written: list[Path] = []
    for src, dst in tqdm(list(zip(sources, targets)), desc="rectify", unit="img",
                         file=sys.stderr, disable=not progress):
        image = read_image(src, cv2.IMREAD_UNCHANGED)  # ImageFileError (a ValueError)
        height, width = image.shape[:2]
        if (width, height) != size:
            raise ValueError(f"{src} is {width}x{height} but {camera_info} calibrates "
                             f"{size[0]}x{size[1]}")
        rectified = model.rectify(image)
        is_jpeg = dst.suffix.lower() in (".jpg", ".jpeg")
        if not cv2.imwrite(str(dst), rectified, params if is_jpeg else []):
            raise ValueError(f"cannot write {dst} (unsupported extension?)")
        written.append(dst)
    return written


def _run(args: argparse.Namespace) -> int:
    try:
        written = rectify_files(args.camera_info, args.images, args.output,
                                overwrite=not args.no_overwrite,
                                jpeg_quality=args.jpeg_quality)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as exc:
        print(f"perception2d rectify: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} rectified image(s) to {args.output}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``perception2d rectify``."""
    parser = subparsers.add_parser("rectify", help="rectify images with a camera_info YAML",
                                   description=__doc__)
    parser.add_argument("--camera-info", metavar="YAML", required=True,
                        help="camera_info calibration YAML")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="input image files")
    parser.add_argument("-o", "--output", metavar="OUTDIR", required=True,
                        help="output directory (created if missing)")
    parser.add_argument("--jpeg-quality", type=int, default=95,
                        help="JPEG quality for .jpg outputs (95)")
    parser.add_argument("--no-overwrite", action="store_true",
                        help="fail instead of replacing existing outputs")
    parser.set_defaults(func=_run)
