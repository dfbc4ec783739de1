"""``perception2d label`` (CLIP zero-shot labels) and ``perception2d eval clip`` (accuracy).

``label --json`` prints a list of ``{"image": path, "labels": [{"label", "score"}]}`` — scores
are softmax probabilities over the vocabulary, highest first; with ``--boxes`` each entry also
has ``"boxes": [{"box": [x1, y1, x2, y2], "labels": [...]}]`` (the top-level shape is kept).
``eval clip --json`` prints ``{"images", "top1", "top5", "per_class", ...}``.

Models: ``--model`` a manifest name (default ``clip_vit_b32``: its ONNX export in the models
directory, else its fetched checkpoint exported on first use), an export sidecar
``clip_<arch>.json`` or its folder; ``--checkpoint PATH`` exports your own checkpoint on first
use (cached by sha256 under ``$PERCEPTION2D_CACHE_DIR/clip``).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from perception2d_ros.engines.base import BACKEND_CHOICES

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
EXIT_FAIL = 1


class LabelError(RuntimeError):
    """A user-facing failure (printed without a traceback)."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="clip_vit_b32", metavar="NAME",
                   help="manifest CLIP model, or an export sidecar clip_<arch>.json / its "
                        "folder (default clip_vit_b32)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="your CLIP checkpoint (OpenAI .pt, open_clip .pt/.bin, .safetensors); "
                        "exported to ONNX on first use and cached")
    p.add_argument("--arch", default=None,
                   help="architecture of --checkpoint (ViT-B-32, ViT-B-16, ...; append "
                        "-quickgelu for OpenAI-trained weights that are not a TorchScript "
                        ".pt); default: the model's")
    p.add_argument("--vocab", default=None, metavar="A,B,...|@FILE",
                   help="comma-separated phrases, or @file with one phrase per line")
    p.add_argument("--template", action="append", default=None, metavar="TEXT",
                   help="prompt template with {} (repeatable; default: a small ensemble such "
                        "as 'a photo of a {}.'; '{}' uses the phrases verbatim)")
    p.add_argument("--top-k", type=int, default=5, help="labels per image/box (default 5)")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (onnxruntime)")
    p.add_argument("--models-dir", default=None, help="models directory (default: search)")
    p.add_argument("--no-text-cache", action="store_true",
                   help="do not read/write the on-disk text-embedding cache")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def add_parser(subparsers: Any) -> None:
    """Register ``perception2d label``."""
    p = subparsers.add_parser("label", help="CLIP zero-shot labels for images or boxes",
                              description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    _add_model_args(p)
    p.add_argument("--boxes", default=None, metavar="X1,Y1,X2,Y2;...",
                   help="label these boxes (pixels, every image) as square crops")
    p.add_argument("--padding", type=float, default=0.1,
                   help="context around each box, fraction of its size per side (default 0.1)")
    p.set_defaults(func=run_label)


def add_eval_parser(eval_subparsers: Any) -> None:
    """Register ``perception2d eval clip``."""
    doc = "zero-shot top-1/top-5 accuracy of CLIP on a labelled image folder"
    p = eval_subparsers.add_parser("clip", help=doc, description=doc)
    p.add_argument("--images", required=True, help="directory with the images")
    p.add_argument("--labels", required=True, metavar="FILE.json|FILE.csv",
                   help="image → class: JSON {\"file\": \"class\"} or [{\"image\", \"label\"}], "
                        "or CSV rows image,label (header optional)")
    _add_model_args(p)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.set_defaults(func=run_eval)


# --------------------------------------------------------------------------- helpers
def _err(msg: str) -> None:
    print(f"perception2d: error: {msg}", file=sys.stderr)


def parse_vocab(text: str | None) -> list[str]:
    from perception2d_ros.models.clip.vocabulary import parse_phrases

    if not text:
        raise LabelError("--vocab is required (e.g. --vocab \"a cat,a dog\" or @phrases.txt)")
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise LabelError(f"cannot read vocabulary file {path}: {exc}") from exc
        items: Sequence[str] = [ln for ln in lines if ln.strip() and not ln.startswith("#")]
    else:
        items = text.split(",")
    try:
        return parse_phrases(items)
    except ValueError as exc:
        raise LabelError(str(exc)) from exc


def parse_boxes(text: str) -> list[list[float]]:
    boxes = []
    for part in (s.strip() for s in text.split(";")):
        if not part:
            continue
        try:
            vals = [float(v) for v in part.split(",")]
        except ValueError as exc:
            raise LabelError(f"--boxes: '{part}' is not x1,y1,x2,y2") from exc
        if len(vals) != 4 or vals[2] <= vals[0] or vals[3] <= vals[1]:
            raise LabelError(f"--boxes: '{part}' must be x1,y1,x2,y2 with x2>x1 and y2>y1")
        boxes.append(vals)
    if not boxes:
        raise LabelError("--boxes is empty")
    return boxes


def _images(items: Sequence[str | Path]) -> list[Path]:
    out: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTS))
        elif p.is_file():
            out.append(p)
        else:
            raise LabelError(f"image not found: {p}")
    if not out:
        raise LabelError("no images")
    return out


def _read(path: Path) -> Any:
    from perception2d_ros.io.image_files import ImageFileError, read_image

    try:
        return read_image(path)
    except ImageFileError as exc:
        raise LabelError(str(exc)) from exc


def build_labeler(args: argparse.Namespace, phrases: list[str]) -> Any:
    from perception2d_ros.models.clip.labeler import ClipLabeler
    from perception2d_ros.models.clip.checkpoint import CheckpointError
    from perception2d_ros.models.clip.resolve import ClipModelUnavailable, resolve_export
    from perception2d_ros.engines.factory import EngineConfig
    from perception2d_ros.engines.base import EngineError
    from perception2d_ros.engines.model_store import ModelFileError

    try:
        if args.checkpoint:
            print(f"using checkpoint {args.checkpoint} (exported to ONNX on first use, "
                  "then cached)", file=sys.stderr)
        meta = resolve_export(args.model, checkpoint=args.checkpoint, arch=args.arch,
                              models_dir=args.models_dir)
        cfg = EngineConfig(backend=args.backend, device=args.device, precision=args.precision,
                           threads=args.threads)
        labeler = ClipLabeler(meta, cfg, text_cache_dir=None if args.no_text_cache else True,
                              padding=getattr(args, "padding", 0.1))
        labeler.set_vocabulary(phrases, args.template)
    except (ClipModelUnavailable, CheckpointError, ModelFileError, EngineError) as exc:
        raise LabelError(str(exc)) from exc
    except ValueError as exc:
        raise LabelError(str(exc)) from exc
    return labeler


def _labels(result: Any) -> list[dict[str, Any]]:
    return [{"label": lab.name, "score": round(float(lab.score), 6)} for lab in result.labels]


# --------------------------------------------------------------------------- label
def run_label(args: argparse.Namespace) -> int:
    try:
        phrases = parse_vocab(args.vocab)
        boxes = parse_boxes(args.boxes) if args.boxes else None
        images = _images(args.images)
        if args.top_k < 1:
            raise LabelError("--top-k must be >= 1")
        labeler = build_labeler(args, phrases)
        out = []
        skipped = 0
        for path in images:
            try:
                img = _read(path)
            except LabelError as exc:  # skipped with one line; the other images still run
                _err(str(exc))
                skipped += 1
                continue
            entry: dict[str, Any] = {"image": str(path),
                                     "labels": _labels(labeler.label_image(img, args.top_k))}
            if boxes is not None:
                entry["boxes"] = [{"box": [float(v) for v in r.box], "labels": _labels(r)}
                                  for r in labeler.label_boxes(img, boxes, args.top_k,
                                                               args.padding)]
            out.append(entry)
    except LabelError as exc:
        _err(str(exc))
        return EXIT_FAIL
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for entry in out:
            print(f"{entry['image']}: " + ", ".join(
                f"{lab['label']} {lab['score']:.3f}" for lab in entry["labels"]))
            for b in entry.get("boxes", []):
                box = ",".join(f"{v:g}" for v in b["box"])
                print(f"  [{box}]: " + ", ".join(
                    f"{lab['label']} {lab['score']:.3f}" for lab in b["labels"]))
    return EXIT_FAIL if skipped else 0


# --------------------------------------------------------------------------- eval clip
def read_label_file(path: str | Path) -> list[tuple[str, str]]:
    """(image file name, class) pairs from a JSON mapping/list or a CSV file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise LabelError(f"cannot read labels file {p}: {exc}") from exc
    pairs: list[tuple[str, str]] = []
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise LabelError(f"{p}: invalid JSON: {exc}") from exc
        if isinstance(data, dict):
            pairs = [(str(k), str(v)) for k, v in data.items()]
        elif isinstance(data, list):
            for row in data:
                if not isinstance(row, dict) or "image" not in row or "label" not in row:
                    raise LabelError(f"{p}: list entries must be {{\"image\", \"label\"}}")
                pairs.append((str(row["image"]), str(row["label"])))
        else:
            raise LabelError(f"{p}: expected a mapping or a list")
    else:
        rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["image", "label"]:
            rows = rows[1:]
        for row in rows:
            if len(row) < 2:
                raise LabelError(f"{p}: CSV rows must be image,label (got {row})")
            pairs.append((row[0].strip(), row[1].strip()))
    if not pairs:
        raise LabelError(f"{p}: no labelled images")
    return pairs


def run_eval(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    try:
        pairs = read_label_file(args.labels)
        if args.limit:
            pairs = pairs[:args.limit]
        classes = sorted({c for _, c in pairs})
        phrases = parse_vocab(args.vocab) if args.vocab else classes
        missing = [c for c in classes if c not in phrases]
        if missing:
            raise LabelError(f"classes in {args.labels} missing from --vocab: {missing}")
        root = Path(args.images)
        if not root.is_dir():
            raise LabelError(f"--images {root} is not a directory")
        labeler = build_labeler(args, phrases)
        top1 = top5 = 0
        per_class: dict[str, list[int]] = {c: [0, 0] for c in classes}
        t0 = time.monotonic()
        for name, cls in pairs:
            result = labeler.label_image(_read(root / name), top_k=5)
            ranked = list(np.argsort(-result.probs, kind="stable"))
            want = phrases.index(cls)
            hit1, hit5 = ranked[0] == want, want in ranked[:5]
            top1 += int(hit1)
            top5 += int(hit5)
            per_class[cls][0] += int(hit1)
            per_class[cls][1] += 1
        dt = time.monotonic() - t0
    except LabelError as exc:
        _err(str(exc))
        return EXIT_FAIL
    n = len(pairs)
    report = {
        "images": n, "top1": top1 / n, "top5": top5 / n, "vocabulary_size": len(phrases),
        "templates": list(labeler.vocabulary.templates),
        "per_class": {c: {"top1": h / max(t, 1), "images": t} for c, (h, t) in per_class.items()},
        "model": labeler.meta["arch"], "source_sha256": labeler.meta.get("source_sha256"),
        "images_per_s": n / dt if dt > 0 else None,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"CLIP {report['model']} zero-shot on {n} images, {len(phrases)} classes: "
              f"top-1 {report['top1']:.3f}  top-5 {report['top5']:.3f}")
    return 0
