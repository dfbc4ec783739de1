"""Debug-image labels in crowded scenes: on a real COCO dinner-table image (51 annotated objects)
at 640×480 and 1080p, labels stay inside the image, never overlap one another, and the text is
large enough to read."""
from __future__ import annotations

import itertools
import json

import cv2
import numpy as np
import pytest

from perception2d_ros.io import debug_draw as dd

CROWDED = "000000444010.jpg"   # 640x480, 51 objects: people, glasses, cups, cutlery


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _assert_clean(rects, image_hw):
    h, w = image_hw
    for r in rects:
        assert 0 <= r[0] < r[2] <= w and 0 <= r[1] < r[3] <= h, f"label {r} leaves the image"
    for a, b in itertools.combinations(rects, 2):
        assert not _overlap(a, b), f"labels {a} and {b} overlap"


@pytest.fixture(scope="module")
def crowded(data_dir):
    """(image, xyxy, class names) of the crowded image's ground-truth annotations."""
    ann = json.loads((data_dir / "coco" / "annotations" / "instances_tinycoco.json").read_text())
    cats = {c["id"]: c["name"] for c in ann["categories"]}
    image_id = next(i["id"] for i in ann["images"] if i["file_name"] == CROWDED)
    objs = [a for a in ann["annotations"] if a["image_id"] == image_id]
    xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in objs)])
    img = cv2.imread(str(data_dir / "coco" / "images" / CROWDED))
    assert img is not None and len(objs) == 51
    return img, xyxy, [cats[a["category_id"]] for a in objs]


@pytest.mark.parametrize("scale", [1.0, 2.25])   # 640x480 and 1440x1080
def test_crowded_real_scene_labels_never_overlap(crowded, scale, tmp_path):
    img, xyxy, names = crowded
    img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    xyxy = xyxy * scale
    scores = np.linspace(0.95, 0.30, len(names))
    texts = [dd.detection_label(n, s) for n, s in zip(names, scores)]
    _, rects = dd.layout_labels(img.shape[:2], xyxy, texts, scores)
    assert all(r is not None for r in rects), "a label found no free place"
    _assert_clean(rects, img.shape[:2])
    before = img.copy()
    out = dd.draw_detections(img, xyxy, names, scores)
    assert out is img and not np.array_equal(img, before)
    # each label's fill colour is visible at its rectangle's corner: nothing painted over it
    for (x1, y1, x2, y2), n in zip(rects, names):
        assert tuple(int(c) for c in img[y1, x1]) == dd.class_color(n)
    cv2.imwrite(str(tmp_path / f"crowded_{img.shape[0]}.png"), img)


def test_crowded_detector_output_labels_never_overlap(crowded, models_dir):
    """The same through the real detector at a low threshold (many overlapping boxes)."""
    from perception2d_ros.models.yolo.detector import YoloDetector

    img, _, _ = crowded
    det = YoloDetector.from_model("yolox_nano", conf=0.05, max_det=100).detect(img)
    assert len(det.scores) >= 30
    texts = [dd.detection_label(n, s, "a cup of wine 0.31") for n, s in
             zip(det.class_names, det.scores)]          # long labels, as with a CLIP label
    _, rects = dd.layout_labels(img.shape[:2], det.xyxy, texts, det.scores)
    _assert_clean([r for r in rects if r is not None], img.shape[:2])
    assert sum(r is not None for r in rects) >= 30


@pytest.mark.parametrize("height, min_px", [(480, 10), (720, 12), (1080, 18)])
def test_text_is_readable_at_common_sizes(height, min_px):
    scale, thick = dd._text_scale(height)
    (_, cap), _ = cv2.getTextSize("person 0.83", dd.FONT, scale, thick)
    assert cap >= min_px
    assert dd.label_size("person 0.83", height)[1] < height * 0.05   # still small


def test_label_above_box_then_inside_when_no_room():
    sizes = [dd.label_size("car 0.90", 480)] * 2
    boxes = np.array([[100, 200, 300, 300], [400, 0, 600, 200]], float)
    above, top = dd.place_labels((480, 640), boxes, sizes)
    assert above[3] == 200 and above[0] == 100            # sits on the box's top edge
    assert top[1] == 0 and 400 <= top[0] and top[2] <= 600  # inside the box, at its top


def test_colliding_labels_shift_and_stay_near_their_box():
    # three people side by side with the same top edge: each label is wider than the box
    boxes = np.array([[100, 200, 140, 400], [130, 200, 170, 400], [160, 200, 200, 400]], float)
    w, h = dd.label_size("person 0.90", 480)
    rects = dd.place_labels((480, 640), boxes, [(w, h)] * 3)
    _assert_clean(rects, (480, 640))
    assert rects[0] == (100, 200 - h, 100 + w, 200)
    for r, b in zip(rects, boxes):                        # within two label heights of the box
        assert b[1] - 3 * h <= r[1] <= b[3] + h


def test_labels_avoid_occupied_rectangles_and_full_images_drop_labels():
    legend = [(540, 0, 640, 40)]
    w, h = dd.label_size("tv 0.90", 480)
    r = dd.place_labels((480, 640), np.array([[560, 10, 630, 100]], float), [(w, h)],
                        occupied=legend)[0]
    assert not _overlap(r, legend[0])
    full = dd.place_labels((20, 100), np.array([[0, 0, 100, 20]] * 3, float), [(100, 20)] * 3)
    assert full[0] == (0, 0, 100, 20) and full[1:] == [None, None]


def test_no_detections_draws_nothing(crowded):
    img = crowded[0].copy()
    dd.draw_detections(img, np.zeros((0, 4)), [], [])
    assert np.array_equal(img, crowded[0])


def test_label_text_is_composable():
    assert dd.detection_label("person", 0.834) == "person 0.83"
    assert dd.detection_label("person", 0.834, "", "#12", "4.2 m") == "person 0.83 | #12 | 4.2 m"
    img = np.zeros((480, 640, 3), np.uint8)
    dd.draw_detections(img, np.array([[10, 100, 200, 300]]), ["person"], [0.9],
                       text=lambda i: f"track {i + 7}")
    w, h = dd.label_size("track 7", 480)
    assert tuple(int(c) for c in img[100 - h, 10]) == dd.class_color("person")
    assert img[100 - h, 10 + w + 1].sum() == 0                  # the label is exactly that wide


def test_draw_frame_composes_clip_labels_and_avoids_the_legend(crowded):
    from types import SimpleNamespace

    img, xyxy, names = crowded
    n = 12
    det = SimpleNamespace(xyxy=xyxy[:n], class_names=names[:n], scores=np.linspace(.9, .5, n))
    clip = SimpleNamespace(hypotheses=[[("a wine glass", 0.71)]] + [[]] * (n - 1))
    label_map = np.full(img.shape[:2], 255, np.uint8)
    label_map[:, :200] = 0
    label_map[:, 200:] = 1
    frame = SimpleNamespace(bgr=lambda: img, detections=det, clip=clip, masks=None,
                            labels=SimpleNamespace(label_map=label_map,
                                                   vocabulary=["floor", "table"]))
    assert dd.label_parts(frame)[0] == ["a wine glass 0.71"] and dd.label_parts(frame)[1] == []
    out = dd.draw_frame(frame)
    assert out is not img and out.shape == img.shape
    legend = dd.legend_rects(np.zeros_like(img), ["floor", "table"], [(0, 0, 0)] * 2)
    texts = [dd.detection_label(nm, s, *p) for nm, s, p in
             zip(det.class_names, det.scores, dd.label_parts(frame))]
    _, rects = dd.layout_labels(img.shape[:2], det.xyxy, texts, det.scores, legend)
    assert texts[0] == f"{names[0]} 0.90 | a wine glass 0.71"
    _assert_clean([r for r in rects if r is not None] + legend, img.shape[:2])


def test_label_parts_show_the_track_id_first(crowded):
    from types import SimpleNamespace

    img, xyxy, names = crowded
    det = SimpleNamespace(xyxy=xyxy[:3], class_names=names[:3], scores=np.array([.9, .8, .7]))
    clip = SimpleNamespace(hypotheses=[[("a wine glass", 0.71)], [], []])
    frame = SimpleNamespace(bgr=lambda: img, detections=det, clip=clip, masks=None,
                            labels=None, track_ids=["7", "12", "3"])
    assert dd.label_parts(frame) == [["#7", "a wine glass 0.71"], ["#12"], ["#3"]]
    frame.track_ids = None                      # untracked: no id shown
    assert dd.label_parts(frame)[1] == []
