"""``perception2d seglabels`` (LSeg label maps) and ``perception2d eval seg`` (mIoU).

seglabels: for each image, a label-map PNG of the same size (value = vocabulary index,
255 = other; uint16 with 65535 = other for vocabularies of 255+ phrases), a colour overlay PNG
with a legend, and with ``--json`` the pixel share of each label.

The image side runs the exported LSeg encoder (ONNX Runtime / TensorRT); the vocabulary is
encoded with CLIP ViT-B/32's text tower (or read from ``--text-embeds``), so a new
vocabulary never needs a new engine.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from perception2d_ros.engines.base import BACKEND_CHOICES
from perception2d_ros.models.lseg.resolve import (SegLabelsError, open_segmenter, resolve_model,
                                                  text_embeddings)

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
DEFAULT_MODEL = "lseg_demo_e200"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------- parsers
def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME",
                   help=f"LSeg model: a manifest name (default {DEFAULT_MODEL}; its export "
                        "<NAME>_image is used), an architecture name with --checkpoint, or "
                        "an exported .onnx (sidecar .json next to it)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="lang-seg checkpoint (e.g. demo_e200.ckpt); exported once to ONNX "
                        "into the cache dir and reused")
    p.add_argument("--models-dir", default=None, metavar="DIR")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where --checkpoint exports go (default "
                        "$PERCEPTION2D_CACHE_DIR/lseg, else ~/.cache/perception2d/lseg)")
    p.add_argument("--input-size", type=int, default=480,
                   help="network input side for --checkpoint exports (multiple of 32)")
    p.add_argument("--text-model", default="clip_vit_b32", metavar="NAME",
                   help="CLIP model whose text tower encodes the vocabulary (LSeg was trained "
                        "against ViT-B/32's; default clip_vit_b32). With --checkpoint the CLIP "
                        "stored in the LSeg checkpoint is used instead")
    p.add_argument("--text-embeds", default=None, metavar="NPY",
                   help="precomputed (N, 512) text embeddings, one row per phrase, instead of "
                        "running the CLIP text encoder")
    p.add_argument("--other-threshold", type=float, default=None,
                   help="best cosine similarity below which a pixel is 'other'")
    p.add_argument("--scales", default="1.0", metavar="LIST",
                   help="lang-seg multi-size evaluation: comma-separated scales of the network "
                        "input (default 1.0; 'official' = the lang-seg demo set 0.75,1.0,1.25,"
                        "1.5,1.75,2.25). Each scale costs one network run per input-size window"
                        " (x2 with --flip)")
    p.add_argument("--flip", action="store_true",
                   help="also evaluate the mirrored image and average (lang-seg's flip)")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime CPU threads")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "seglabels", help="LSeg label maps for images",
        description="LSeg open-vocabulary label maps: per image a label-map PNG (vocabulary "
                    "index per pixel, 255 = other), a colour overlay with legend and, with "
                    "--json, the pixel share of each label.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or directories")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    voc = p.add_mutually_exclusive_group()
    voc.add_argument("--vocab", default=None, metavar="PHRASES",
                     help='comma-separated phrases, e.g. "floor,wall,door,person"')
    voc.add_argument("--vocab-file", default=None, metavar="YAML",
                     help="vocabulary YAML (default config/lseg_indoor_vocabulary.yaml)")
    p.add_argument("--other-phrase", default=None, metavar="PHRASE",
                   help="catch-all phrase whose pixels are written as 'other' (255)")
    p.add_argument("--json", action="store_true",
                   help="write <stem>_labels.json (pixel share per label) and print one JSON "
                        "line per image")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    _model_args(p)
    p.set_defaults(func=cmd_seglabels)


def add_eval_parser(eval_subparsers: Any) -> None:
    p = eval_subparsers.add_parser(
        "seg", help="LSeg semantic segmentation: mIoU and pixel accuracy",
        description="Evaluate label maps against ADE20K / VOC-format ground truth.")
    p.add_argument("--images", required=True, metavar="DIR")
    p.add_argument("--labels", required=True, metavar="DIR",
                   help="ground truth: VOC label PNGs (<base>_target.png / <base>.png, "
                        "palettised, grey index or VOC-colour RGB; 255 ignored) or ADE20K "
                        "<base>_seg.png + <base>.json (object names)")
    p.add_argument("--classes", required=True, metavar="LIST",
                   help='class names in ground-truth index order: "background,aeroplane,..",'
                        " a text file (one per line), 'voc' (the 21 VOC classes); for ADE20K "
                        "the names to score (matched against each object's synonyms)")
    p.add_argument("--format", default="auto", choices=["auto", "voc", "ade20k", "index"])
    p.add_argument("--pred", default=None, metavar="DIR",
                   help="score existing label maps (<stem>_labels.png from seglabels, or "
                        "<stem>.png) instead of running the model")
    p.add_argument("--prompts", default=None, metavar="LIST",
                   help="text phrases for the classes, same order (default: the class names)")
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _model_args(p)
    p.set_defaults(func=cmd_eval_seg)



def _list_images(items: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTS
                              and not q.stem.endswith(("_seg", "_target", "_labels",
                                                       "_overlay"))))
        elif p.is_file():
            out.append(p)
        else:
            raise SegLabelsError(f"image not found: {p}")
    if not out:
        raise SegLabelsError("no images")
    return out


# --------------------------------------------------------------------------- seglabels
def cmd_seglabels(args: argparse.Namespace) -> int:
    try:
        return _seglabels(args)
    except SegLabelsError as exc:
        _err(str(exc))
        return EXIT_FAIL


def _load_vocab(args: argparse.Namespace) -> Any:
    from perception2d_ros.models.lseg.vocabulary import LSegVocabulary

    try:
        if args.vocab:
            vocab = LSegVocabulary.from_phrases(args.vocab)
        else:
            vocab = LSegVocabulary.from_yaml(args.vocab_file) if args.vocab_file else \
                LSegVocabulary.from_yaml()
    except (OSError, ValueError) as exc:
        raise SegLabelsError(f"vocabulary: {exc}") from exc
    import dataclasses

    if args.other_phrase is not None:
        vocab = dataclasses.replace(vocab, other_phrase=args.other_phrase.strip() or None)
    if args.other_threshold is not None:
        vocab = dataclasses.replace(vocab, other_threshold=args.other_threshold)
    return vocab


def _seglabels(args: argparse.Namespace) -> int:
    import cv2
    import numpy as np

    from perception2d_ros.models.lseg.palette import overlay, phrase_palette

    images = _list_images(args.images)
    vocab = _load_vocab(args)
    onnx = resolve_model(args)
    seg = open_segmenter(onnx, args)
    try:
        phrases = vocab.text_phrases
        text = text_embeddings(phrases, vocab.templates, seg.meta, args)
        big = len(phrases) >= 255
        if big:
            seg.other_value = 65535
        palette = phrase_palette(phrases)
        out_dir = Path(args.output)
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in images:
            from perception2d_ros.io.image_files import ImageFileError, read_image

            try:
                img = read_image(path)
            except ImageFileError as exc:
                raise SegLabelsError(str(exc)) from exc
            res = seg.segment(img, text, vocab.other_threshold, labels=phrases,
                              other_classes=vocab.other_classes)
            lm = res.label_map if big else res.label_map.astype(np.uint8)
            cv2.imwrite(str(out_dir / f"{path.stem}_labels.png"), lm)
            cv2.imwrite(str(out_dir / f"{path.stem}_overlay.png"),
                        overlay(img, res, palette, alpha=args.alpha, labels=phrases))
            shares = res.shares()
            if args.json:
                doc = {"image": str(path), "width": int(img.shape[1]),
                       "height": int(img.shape[0]), "vocabulary": list(phrases),
                       "other_value": int(seg.other_value),
                       "shares": {k: round(v, 6) for k, v in shares.items()},
                       "label_map": f"{path.stem}_labels.png"}
                (out_dir / f"{path.stem}_labels.json").write_text(json.dumps(doc, indent=2),
                                                                  encoding="utf-8")
                print(json.dumps(doc))
            else:
                top = sorted(((v, k) for k, v in shares.items() if v > 0), reverse=True)[:5]
                print(f"{path.name}: " + ", ".join(f"{k} {100 * v:.1f}%" for v, k in top))
    finally:
        seg.close()
    return EXIT_OK


# --------------------------------------------------------------------------- eval seg
def _parse_classes(text: str) -> list[str]:
    from perception2d_ros.eval.segmentation import VOC_CLASSES

    if text.strip().lower() == "voc":
        return list(VOC_CLASSES)
    p = Path(text).expanduser()
    if p.is_file():
        if p.suffix in (".yaml", ".yml"):
            from perception2d_ros.models.lseg.vocabulary import LSegVocabulary

            return list(LSegVocabulary.from_yaml(p).phrases)
        return [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return [c.strip() for c in text.split(",") if c.strip()]


def _find_label(image: Path, labels_dir: Path) -> Path | None:
    base = image.stem[:-len("_image")] if image.stem.endswith("_image") else image.stem
    for cand in (f"{base}_target.png", f"{base}_seg.png", f"{base}.png", f"{image.stem}.png"):
        q = labels_dir / cand
        if q.is_file() and q.resolve() != image.resolve():
            return q
    return None


def read_ground_truth(label_path: Path, classes: Sequence[str], fmt: str = "auto") -> Any:
    """Ground truth as (H, W) uint8 indices into ``classes`` (255 = ignore)."""
    import cv2
    import numpy as np

    from perception2d_ros.eval.segmentation import (map_names_to_classes, read_ade20k_label,
                                                    read_voc_label)

    if fmt == "auto":
        fmt = "ade20k" if label_path.name.endswith("_seg.png") else "voc"
    if fmt == "ade20k":
        idx, names = read_ade20k_label(label_path)
        return map_names_to_classes(idx, names, classes)
    if fmt == "index":
        gt = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
        if gt is None or gt.ndim != 2:
            raise SegLabelsError(f"{label_path}: not a single-channel index PNG")
        return np.where(gt < len(classes), gt, 255).astype(np.uint8)
    return read_voc_label(label_path)


def cmd_eval_seg(args: argparse.Namespace) -> int:
    try:
        return _eval_seg(args)
    except SegLabelsError as exc:
        _err(str(exc))
        return EXIT_FAIL


def _eval_seg(args: argparse.Namespace) -> int:
    import cv2
    import numpy as np

    from perception2d_ros.eval.segmentation import confusion_matrix, segmentation_metrics

    classes = _parse_classes(args.classes)
    if not classes:
        raise SegLabelsError("--classes is empty")
    prompts = _parse_classes(args.prompts) if args.prompts else classes
    if len(prompts) != len(classes):
        raise SegLabelsError(f"--prompts has {len(prompts)} entries, --classes {len(classes)}")
    img_dir, lab_dir = Path(args.images), Path(args.labels)
    if not img_dir.is_dir() or not lab_dir.is_dir():
        raise SegLabelsError("--images and --labels must be directories")
    pairs = []
    for img in _list_images([str(img_dir)]):
        lab = _find_label(img, lab_dir)
        if lab is not None:
            pairs.append((img, lab))
    if args.limit:
        pairs = pairs[: args.limit]
    if not pairs:
        raise SegLabelsError(f"no image in {img_dir} has a label in {lab_dir}")

    seg = text = None
    if args.pred is None:
        seg = open_segmenter(resolve_model(args), args)
        text = text_embeddings(prompts, seg.meta.text_templates, seg.meta, args)
    conf = np.zeros((len(classes), len(classes) + 1), np.int64)
    try:
        for img_path, lab_path in pairs:
            gt = read_ground_truth(lab_path, classes, args.format)
            if seg is not None:
                img = cv2.imread(str(img_path), cv2.IMREAD_COLOR)
                if img is None:
                    raise SegLabelsError(f"cannot read image {img_path}")
                pred = seg.segment(img, text, args.other_threshold).label_map
            else:
                pdir = Path(args.pred)
                cand = [pdir / f"{img_path.stem}_labels.png", pdir / f"{img_path.stem}.png"]
                found = next((c for c in cand if c.is_file()), None)
                if found is None:
                    raise SegLabelsError(f"no prediction for {img_path.name} in {pdir}")
                pred = cv2.imread(str(found), cv2.IMREAD_UNCHANGED)
            if pred.shape[:2] != gt.shape[:2]:
                raise SegLabelsError(f"{img_path.name}: prediction {pred.shape[:2]} vs ground "
                                     f"truth {gt.shape[:2]}")
            conf += confusion_matrix(pred, gt, len(classes))
    finally:
        if seg is not None:
            seg.close()
    metrics = segmentation_metrics(conf, classes)
    metrics["images"] = len(pairs)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"images {len(pairs)}  pixels {metrics['pixels']}  mIoU {metrics['miou']:.4f}  "
              f"pixel accuracy {metrics['pixel_accuracy']:.4f}")
        for name, iou in sorted(metrics["per_class_iou"].items(), key=lambda kv: -kv[1]):
            print(f"  {name:24s} IoU {iou:.4f}")
    return EXIT_OK
