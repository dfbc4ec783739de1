"""Tracker (core/tracking.py), track stage and per-track CLIP labels: constructed cases with
known answers, then the real detector + tracker on the real Apollo and Udacity clips."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from perception2d_ros.models.clip.stage import TrackLabels
from perception2d_ros.models.detections import Detections
from perception2d_ros.pipeline.config import merge_config, validate_config
from perception2d_ros.pipeline.frame import Frame
from perception2d_ros.models.tracking.stage import TrackStage
from perception2d_ros.models.tracking.bytetrack import ByteTracker, TrackerConfig, iou_matrix

CLIPS = Path(__file__).resolve().parents[1] / "data" / "realcam" / "tracking"


def box(x: float, y: float = 100.0, w: float = 50.0, h: float = 80.0) -> list[float]:
    return [x, y, x + w, y + h]


def step(t: ByteTracker, boxes: list[list[float]], scores: list[float]) -> dict[int, int]:
    """detection index → track id for one frame."""
    r = t.update(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32))
    return dict(zip(r.indices.tolist(), r.track_ids.tolist()))


@pytest.mark.parametrize("a,b,expected", [
    (box(0), box(0), 1.0),
    (box(0), box(25), (25 * 80) / (75 * 80)),
    (box(0), box(100), 0.0),
    ([0, 0, 0, 0], [0, 0, 0, 0], 0.0),  # empty boxes: no division by zero
])
def test_iou_table(a, b, expected):
    assert iou_matrix(np.array([a]), np.array([b]))[0, 0] == pytest.approx(expected)


def test_iou_empty_inputs():
    assert iou_matrix(np.zeros((0, 4)), np.zeros((3, 4))).shape == (0, 3)


def test_no_detections_and_empty_frames():
    t = ByteTracker()
    assert step(t, [], []) == {}
    assert len(t) == 0


def test_min_hits_then_stable_id_while_moving():
    t = ByteTracker(TrackerConfig(min_hits=3))
    assert step(t, [box(100)], [0.9]) == {}        # tentative
    assert step(t, [box(105)], [0.9]) == {}
    first = step(t, [box(110)], [0.9])             # confirmed on the 3rd hit
    assert list(first) == [0]
    tid = first[0]
    for k in range(4, 30):                         # constant velocity: same id
        assert step(t, [box(100 + 5 * k)], [0.9]) == {0: tid}


def test_id_survives_occlusion_up_to_max_age_only():
    t = ByteTracker(TrackerConfig(min_hits=1, max_age=5))
    tid = step(t, [box(100)], [0.9])[0]
    for k in range(1, 6):
        step(t, [box(100 + 4 * k)], [0.9])
    for _ in range(5):                             # hidden 5 frames (= max_age): kept
        assert step(t, [], []) == {}
    assert step(t, [box(100 + 4 * 11)], [0.9]) == {0: tid}   # back where predicted
    for _ in range(6):                             # hidden 6 frames: deleted
        step(t, [], [])
    again = step(t, [box(100 + 4 * 18)], [0.9])
    assert again and again[0] != tid


def test_low_score_detection_continues_a_track_but_never_starts_one():
    cfg = TrackerConfig(min_hits=1, high_threshold=0.5, low_threshold=0.1)
    t = ByteTracker(cfg)
    tid = step(t, [box(100)], [0.9])[0]
    assert step(t, [box(102)], [0.2]) == {0: tid}  # second association (occluded, blurred)
    assert step(ByteTracker(cfg), [box(100)], [0.2]) == {}   # a lone low score: nothing
    assert step(t, [box(104)], [0.05]) == {}       # below low_threshold: ignored


def test_two_crossing_objects_keep_their_ids():
    t = ByteTracker(TrackerConfig(min_hits=1))
    ids = step(t, [box(100), box(400)], [0.9, 0.8])
    a, b = ids[0], ids[1]
    for k in range(1, 12):   # they approach each other; order of detections swapped
        got = step(t, [box(400 - 10 * k), box(100 + 10 * k)], [0.8, 0.9])
        assert got == {0: b, 1: a}


def test_class_aware_matching():
    t = ByteTracker(TrackerConfig(min_hits=1, class_aware=True))
    r = t.update(np.array([box(100)]), np.array([0.9]), np.array([0]))
    tid = int(r.track_ids[0])
    r = t.update(np.array([box(101)]), np.array([0.9]), np.array([1]))  # other class
    assert int(r.track_ids[0]) != tid


@pytest.mark.parametrize("key,value,message", [
    ("high_threshold", 1.5, "track.high_threshold"),
    ("low_threshold", 0.7, "track.low_threshold"),
    ("min_hits", 0, "track.min_hits"),
    ("max_age", -1, "track.max_age"),
    ("bogus", 1, "unknown key"),
])
def test_config_errors_name_the_parameter(key, value, message):
    with pytest.raises(ValueError, match=message):
        TrackerConfig.from_dict({key: value})
    cfg = merge_config({"stages": ["detect", "track"], "track": {key: value}})
    with pytest.raises(ValueError, match=message):
        validate_config(cfg)


def _frame(boxes: list[list[float]], stamp: int, frame_id: str = "cam", source: str = ""
           ) -> Frame:
    f = Frame(np.zeros((1, 1), np.uint8), "mono8", stamp, frame_id, source=source)
    n = len(boxes)
    f.detections = Detections(np.array(boxes, np.float32).reshape(-1, 4),
                              np.full(n, 0.9, np.float32), np.zeros(n, np.int64), ["car"] * n)
    return f


def test_stage_filters_to_tracks_and_sets_string_ids():
    stage = TrackStage(TrackerConfig(min_hits=2))
    f = _frame([box(100), box(300)], 1)
    stage.process(f)
    assert len(f.detections) == 0 and f.track_ids == []
    f = _frame([box(102), box(302), box(600)], 2)   # the new third one is tentative
    stage.process(f)
    assert f.track_ids == ["1", "2"] and len(f.detections) == 2
    assert f.detections.class_names == ["car", "car"]


def test_stage_resets_a_camera_on_stamp_jump_or_frame_id_change_with_one_line():
    lines: list[str] = []
    stage = TrackStage(TrackerConfig(min_hits=1), log=lines.append)
    ids_left = []
    for k in range(3):
        f = _frame([box(100 + k)], 10 + k, source="left")
        stage.process(f)
        ids_left.append(f.track_ids[0])
        g = _frame([box(100 + k)], 10 + k, source="right")   # independent camera
        stage.process(g)
    assert len(set(ids_left)) == 1 and g.track_ids[0] != ids_left[0]
    f = _frame([box(103)], 5, source="left")      # stamp went back (bag loop)
    stage.process(f)
    assert len(lines) == 1 and "left" in lines[0] and "back" in lines[0]
    assert f.track_ids[0] not in (ids_left[0], g.track_ids[0])   # new id, never reused
    h = _frame([box(103)], 14, frame_id="other", source="right")
    stage.process(h)
    assert len(lines) == 2 and "frame_id" in lines[1] and "right" in lines[1]
    g2 = _frame([box(104)], 15, frame_id="other", source="right")
    stage.process(g2)
    assert len(lines) == 2                        # one line per reset, not per frame


def test_track_labels_running_mean_is_stable_where_frames_flicker():
    acc = TrackLabels()
    frame_top, track_top = [], []
    for k in range(10):    # a crop that flickers: car 0.6 / truck 0.4 and back, 1 in 3 bad
        p = np.array([[0.6, 0.4]]) if k % 3 != 2 else np.array([[0.35, 0.65]])
        mean = acc.update("", ["7"], p.astype(np.float32), version=1)
        frame_top.append(int(p[0].argmax()))
        track_top.append(int(mean[0].argmax()))
    assert set(frame_top) == {0, 1} and set(track_top) == {0}
    assert acc.frames_of("", "7") == 10
    acc.update("", ["7"], np.array([[1.0, 0.0, 0.0]], np.float32), version=2)
    assert acc.frames_of("", "7") == 1             # new vocabulary: start over


# ----------------------------------------------------------------------------- real clips
@pytest.fixture(scope="module")
def detector():
    from perception2d_ros.engines.factory import EngineConfig
    from perception2d_ros.models.yolo.detector import YoloDetector

    return YoloDetector.from_model("yolox_nano", engine_config=EngineConfig(
        backend="onnxruntime", device="cpu", threads=1), conf=0.1, iou=0.45, max_det=100)


def _track_clip(detector, folder: str) -> list[tuple[list[str], np.ndarray]]:
    stage = TrackStage()
    out = []
    for i, path in enumerate(sorted((CLIPS / folder).glob("*.jpg"))):
        f = Frame(np.zeros((1, 1), np.uint8), "mono8", i, "cam")
        f.detections = detector.detect(cv2.imread(str(path)))
        stage.process(f)
        out.append((f.track_ids, f.detections.xyxy))
    return out


def test_udacity_highway_each_car_keeps_one_id(detector):
    """The two near cars (black on the left, white on the right, both in all 38 frames)
    each get one id for the whole clip, and no other id is handed out."""
    frames = _track_clip(detector, "udacity_highway_640")
    sides: dict[str, set[str]] = {"left": set(), "right": set()}
    seen = {"left": 0, "right": 0}
    for ids, xyxy in frames:
        for tid, (x1, y1, x2, y2) in zip(ids, xyxy):
            if y2 - y1 >= 30:
                side = "left" if (x1 + x2) / 2 < 490 else "right"
                sides[side].add(tid)
                seen[side] += 1
    assert len(sides["left"]) == 1 and len(sides["right"]) == 1
    assert sides["left"] != sides["right"]
    assert min(seen.values()) >= 36   # all frames after min_hits
    assert {t for ids, _ in frames for t in ids} == sides["left"] | sides["right"]


def test_apollo_minivan_keeps_one_id(detector):
    """The minivan ahead (GT class 0 of det_gt.txt, 1920x1080 pixels) keeps one id."""
    gt = {}
    lines = (CLIPS / "apollo_obstacle_960" / "det_gt.txt").read_text().split("\n")
    i = 0
    while i < len(lines) and lines[i].strip():
        stamp, n = lines[i].split()
        for r in lines[i + 1:i + 1 + int(n)]:
            x, y, w, h, c = (float(v) for v in r.split())
            if int(c) == 0:
                gt[len(gt)] = np.array([x, y, x + w, y + h]) * 0.5
        i += 1 + int(n)
    frames = _track_clip(detector, "apollo_obstacle_960")
    ids = set()
    hits = 0
    for k, (tids, xyxy) in enumerate(frames):
        iou = iou_matrix(gt[k][None], xyxy)[0] if len(xyxy) else np.zeros(0)
        mine = [t for t, v in zip(tids, iou) if v >= 0.5]
        ids |= set(mine)
        hits += bool(mine)
    assert len(ids) == 1 and hits >= 15
