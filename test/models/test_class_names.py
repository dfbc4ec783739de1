"""Official COCO class names out (CLI JSON, Detection2DArray, LabelInfo); VOC aliases accepted in
``classes`` / ``--classes``. Real COCO images with a motorcycle, a tv + couch, airplanes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from perception2d_ros.models.yolo.class_names import (COCO_80, canonical_class_names,
                                               resolve_class_name)
from perception2d_ros.models.yolo.formats import load_labels

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "test" / "data" / "coco" / "images"
# 480985: motorcycles; 491497: tv, couch; 348881: airplanes (COCO val2017, tinycoco)
NAMED = [IMAGES / f"000000{n}.jpg" for n in ("480985", "491497", "348881")]
VOC_SPELLINGS = {"motorbike", "aeroplane", "sofa", "diningtable", "tvmonitor", "pottedplant"}


def cli(*args: str) -> subprocess.CompletedProcess:
    """`perception2d ARGS` as a user runs it (the console script's module, this checkout)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "perception2d_ros.cli.main", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_coco_80_is_the_annotation_files_category_list(data_dir):
    cats = json.loads((data_dir / "coco" / "annotations" / "instances_tinycoco.json")
                      .read_text())["categories"]
    assert [c["name"] for c in sorted(cats, key=lambda c: c["id"])] == list(COCO_80)


def test_shipped_labels_file_is_published_with_official_names(models_dir):
    names = load_labels(models_dir / "coco_classes.txt")
    assert VOC_SPELLINGS <= set(names)            # the file itself keeps its upstream spelling
    assert canonical_class_names(names) == list(COCO_80)


@pytest.mark.parametrize("names", [
    ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
     "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
     "sheep", "sofa", "train", "tvmonitor"],              # a VOC model: VOC is its own contract
    ["motorbike", "helmet"],                               # a custom model
    [],
])
def test_other_class_lists_are_kept_as_given(names):
    assert canonical_class_names(names) == names


@pytest.mark.parametrize("query, expected", [
    ("motorcycle", 3), ("motorbike", 3), ("aeroplane", 4), ("sofa", 57), ("couch", 57),
    ("diningtable", 60), ("dining_table", 60), ("Dining Table", 60), ("tvmonitor", 62),
    ("pottedplant", 58), ("person", 0), ("unicorn", None),
])
def test_resolve_accepts_official_names_and_aliases(query, expected):
    assert resolve_class_name(query, COCO_80) == expected


def test_resolve_official_name_against_a_voc_spelled_custom_list():
    assert resolve_class_name("motorcycle", ["helmet", "motorbike"]) == 1


def test_detect_cli_json_uses_official_names():
    r = cli("detect", *map(str, NAMED), "--json")
    assert r.returncode == 0, r.stderr
    names = {d["class_name"] for img in json.loads(r.stdout) for d in img["detections"]}
    assert {"motorcycle", "tv", "couch", "airplane"} <= names
    assert not names & VOC_SPELLINGS


@pytest.mark.parametrize("classes", ["motorbike,tvmonitor,sofa,aeroplane",
                                     "motorcycle,tv,couch,airplane"])
def test_detect_cli_classes_accepts_both_spellings(classes):
    r = cli("detect", *map(str, NAMED), "--json", "--classes", classes)
    assert r.returncode == 0, r.stderr
    names = [d["class_name"] for img in json.loads(r.stdout) for d in img["detections"]]
    assert set(names) == {"motorcycle", "tv", "couch", "airplane"}


def test_detect_cli_unknown_class_is_refused():
    r = cli("detect", str(NAMED[0]), "--classes", "unicorn")
    assert r.returncode != 0
    assert "unicorn" in (r.stderr + r.stdout)


@pytest.mark.ros
def test_detector_node_publishes_official_names_and_accepts_aliases():
    pytest.importorskip("rclpy", reason="node tests need rclpy (installed by `make test`)")
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image
    from vision_msgs.msg import Detection2DArray, LabelInfo

    from std_msgs.msg import Header

    from perception2d_ros.ros.conversions import array_to_image_msg, ns_to_stamp
    from perception2d_ros.ros.perception_node import PerceptionNode
    from ros_harness import BEST_EFFORT, LATCHED, RELIABLE, RosHarness, wait_for

    h = RosHarness()
    try:
        node = PerceptionNode("detector_node", context=h.context, namespace="/camera",
                              parameter_overrides=[Parameter(
                                  "detect.classes", value=["motorbike", "sofa", "tvmonitor"])])
        h.add_node(node)
        labels = h.subscribe(LabelInfo, "/camera/detections/label_info", LATCHED)
        dets = h.subscribe(Detection2DArray, "/camera/detections", RELIABLE)
        pub = h.publisher(Image, "/camera/image_rect", BEST_EFFORT)
        assert h.wait_matched(pub)
        for i, f in enumerate(NAMED[:2]):
            n = len(dets)
            header = Header(stamp=ns_to_stamp(1_700_000_000_000_000_000 + i * 100_000_000),
                            frame_id="camera_optical")
            pub.publish(array_to_image_msg(cv2.imread(str(f)), "bgr8", header))
            assert wait_for(lambda: len(dets) > n, 20), "no Detection2DArray for a frame"
        assert wait_for(lambda: len(labels) == 1, 5)
        class_map = {c.class_id: c.class_name for c in labels[0].class_map}
        assert [class_map[i] for i in range(len(COCO_80))] == list(COCO_80)
        published = {d.results[0].hypothesis.class_id for m in dets for d in m.detections}
        assert published == {"motorcycle", "couch", "tv"}
    finally:
        h.close()

