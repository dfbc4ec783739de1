"""Class names: the official COCO names, and the VOC-style aliases some label files use.

Detectors trained on COCO publish COCO's own category names (the ``name`` fields of
``instances_*.json``, also what Ultralytics and most downstream consumers use): ``motorcycle``,
``airplane``, ``couch``, ``dining table``, ``tv``, ``potted plant``, ... Label files derived from
Darknet/VOC (ours among them, ``models/coco_classes.txt``) spell six of them VOC-style
(``motorbike``, ``aeroplane``, ``sofa``, ``diningtable``, ``tvmonitor``, ``pottedplant``).
A class list that *is* the COCO-80 list up to those aliases is published with the official
names; any other list (a custom or VOC model) is kept as given. Users may write either spelling
in ``classes`` / ``--classes``.
"""
from __future__ import annotations

from typing import Sequence

#: The 80 COCO detection categories in contiguous-index order (category ids 1..90 with gaps).
COCO_80: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)

#: Other spellings of COCO names seen in label files (VOC / Darknet), alias → official name.
COCO_ALIASES: dict[str, str] = {
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "sofa": "couch",
    "diningtable": "dining table",
    "tvmonitor": "tv",
    "tv monitor": "tv",
    "pottedplant": "potted plant",
    "hair dryer": "hair drier",
    "doughnut": "donut",
}


def _key(name: str) -> str:
    """Spelling-insensitive form: lower case, '_'/'-' as spaces, single spaces."""
    return " ".join(name.strip().lower().replace("_", " ").replace("-", " ").split())


def official_coco_name(name: str) -> str:
    """The official COCO spelling of ``name`` when it is a known alias, else ``name``."""
    return COCO_ALIASES.get(_key(name), COCO_ALIASES.get(name, name))


def canonical_class_names(names: Sequence[str]) -> list[str]:
    """``names`` with COCO's official names when the list is the COCO-80 list written with
    aliases (e.g. ``models/coco_classes.txt``); any other list is returned unchanged."""
    names = [str(n) for n in names]
    if len(names) == len(COCO_80) and \
            tuple(official_coco_name(n) for n in names) == COCO_80:
        return list(COCO_80)
    return names


def resolve_class_name(name: str, class_names: Sequence[str]) -> int | None:
    """Index of ``name`` in ``class_names``, accepting the official COCO name and its aliases
    for one another and ignoring case / '_' / '-'; ``None`` when it matches no class."""
    names = list(class_names)
    if name in names:
        return names.index(name)
    want = official_coco_name(_key(name))
    for i, n in enumerate(names):
        if official_coco_name(_key(n)) == want:
            return i
    return None
