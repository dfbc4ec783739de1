"""detector_node over real rclpy pub/sub, replaying a bag made from the tinycoco images."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

pytest.importorskip("rclpy", reason="node tests need rclpy (installed by `make test`)")

from rclpy.parameter import Parameter  # noqa: E402
from rclpy.serialization import deserialize_message  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402
from vision_msgs.msg import Detection2DArray, LabelInfo  # noqa: E402

from perception2d_ros.io.bag_messages import camera_info_msg, image_msg  # noqa: E402
from perception2d_ros.io.bag_reader import BagReader  # noqa: E402
from perception2d_ros.io.bag_writer import BagWriter  # noqa: E402
from perception2d_ros.geometry.camera import CameraModel  # noqa: E402
from perception2d_ros.geometry.extrinsics import Extrinsics  # noqa: E402
from perception2d_ros.models.yolo.detector import YoloDetector  # noqa: E402
from perception2d_ros.ros.perception_node import PerceptionNode  # noqa: E402
from ros_harness import BEST_EFFORT, LATCHED, RELIABLE, RosHarness, wait_for  # noqa: E402

pytestmark = pytest.mark.ros
N_IMAGES = 12


@pytest.fixture(scope="module")
def coco_bag(tmp_path_factory, data_dir):
    """image_rect frames of the real COCO images at their own sizes, 5 Hz."""
    path = tmp_path_factory.mktemp("bags") / "coco_rect.mcap"
    files = sorted((data_dir / "coco" / "images").glob("*.jpg"))[:N_IMAGES]
    with BagWriter(path) as bag:
        bag.add_topic("/camera/image_rect", "sensor_msgs/msg/Image")
        for i, f in enumerate(files):
            ts = 1_700_000_000_000_000_000 + i * 200_000_000
            bag.write("/camera/image_rect", ts,
                      image_msg(bag.typestore, cv2.imread(str(f)), ts, "camera_optical"))
    with BagReader(path) as reader:
        return [deserialize_message(bytes(m.rawdata), Image) for m in reader.messages()]


@pytest.fixture(scope="module")
def offline_detector():
    return YoloDetector.from_model("yolox_nano", conf=0.3, iou=0.45, max_det=100)


@pytest.fixture()
def harness():
    h = RosHarness()
    yield h
    h.close()


def _boxes(msg: Detection2DArray) -> tuple[np.ndarray, list[str], np.ndarray]:
    xyxy = np.array([[d.bbox.center.position.x - d.bbox.size_x / 2,
                      d.bbox.center.position.y - d.bbox.size_y / 2,
                      d.bbox.center.position.x + d.bbox.size_x / 2,
                      d.bbox.center.position.y + d.bbox.size_y / 2]
                     for d in msg.detections]).reshape(-1, 4)
    names = [d.results[0].hypothesis.class_id for d in msg.detections]
    scores = np.array([d.results[0].hypothesis.score for d in msg.detections])
    return xyxy, names, scores


def test_detector_node_matches_offline_wrapper(harness, coco_bag, offline_detector):
    node = PerceptionNode("detector_node", context=harness.context, namespace="/camera")
    harness.add_node(node)
    labels = harness.subscribe(LabelInfo, "/camera/detections/label_info", LATCHED)
    dets = harness.subscribe(Detection2DArray, "/camera/detections", RELIABLE)
    pub = harness.publisher(Image, "/camera/image_rect", BEST_EFFORT)
    assert harness.wait_matched(pub)
    for msg in coco_bag:
        n = len(dets)
        pub.publish(msg)
        assert wait_for(lambda: len(dets) > n, 20), "no Detection2DArray for a frame"
    assert len(dets) == len(coco_bag)
    assert wait_for(lambda: len(labels) == 1, 5)
    assert [c.class_name for c in labels[0].class_map][:3] == ["person", "bicycle", "car"]
    total = 0
    for img_msg, out in zip(coco_bag, dets):
        assert out.header.stamp == img_msg.header.stamp
        assert out.header.frame_id == "camera_optical"
        img = np.frombuffer(bytes(img_msg.data), np.uint8).reshape(img_msg.height,
                                                                    img_msg.width, 3)
        ref = offline_detector.detect(img)
        xyxy, names, scores = _boxes(out)
        assert names == list(ref.class_names)
        np.testing.assert_allclose(xyxy, ref.xyxy, atol=1e-3)
        np.testing.assert_allclose(scores, ref.scores, atol=1e-6)
        # boxes are in the image's own pixels (not network 416x416 coordinates)
        if len(xyxy):
            assert xyxy[:, 2].max() <= img_msg.width + 1e-3
            assert xyxy[:, 3].max() <= img_msg.height + 1e-3
        total += len(xyxy)
    assert total > 20


def test_ground_positions_from_extrinsics(harness, data_dir):
    """A synthetic 640x480 view: bottom-centre of each box → ground point (base frame)."""
    cam = CameraModel.from_yaml(data_dir / "camera_info" / "left_plumb_bob.yaml")
    rect_info = cam.rectified_camera_info_dict()
    params = [Parameter("extrinsics.enabled", value=True),
              Parameter("extrinsics.translation", value=[0.2, 0.0, 1.2]),
              Parameter("extrinsics.rotation_rpy", value=[0.0, 0.5, 0.0]),
              Parameter("extrinsics.parent_frame", value="base_link")]
    node = PerceptionNode("detector_node", context=harness.context, namespace="/camera",
                          parameter_overrides=params)
    harness.add_node(node)
    from perception2d_interfaces.msg import GroundPositionArray

    ground = harness.subscribe(GroundPositionArray, "/camera/detections/ground", RELIABLE)
    dets = harness.subscribe(Detection2DArray, "/camera/detections", RELIABLE)
    pub = harness.publisher(Image, "/camera/image_rect", BEST_EFFORT)
    pub_info = harness.publisher(CameraInfo, "/camera/camera_info_rect", BEST_EFFORT)
    assert harness.wait_matched(pub) and harness.wait_matched(pub_info)
    img = cv2.resize(cv2.imread(str(sorted((data_dir / "coco" / "images").glob("*.jpg"))[0])),
                     (640, 480))
    from rosbags.typesys import Stores, get_typestore
    from rclpy.serialization import deserialize_message as des

    ts = get_typestore(Stores.ROS2_KILTED)
    stamp = 1_700_000_000_000_000_000
    img_msg = des(bytes(ts.serialize_cdr(image_msg(ts, img, stamp, "cam"), "sensor_msgs/msg/Image")), Image)
    info_msg = des(bytes(ts.serialize_cdr(camera_info_msg(ts, rect_info, stamp, "cam"),
                                          "sensor_msgs/msg/CameraInfo")), CameraInfo)
    pub_info.publish(info_msg)
    assert wait_for(lambda: node.cams[0].rect_info is not None, 10)
    pub.publish(img_msg)
    assert wait_for(lambda: len(ground) == 1 and len(dets) == 1, 20)
    g = ground[0]
    assert g.header.frame_id == "base_link" and g.header.stamp == img_msg.header.stamp
    xyxy, names, _ = _boxes(dets[0])
    assert len(g.positions) == len(names) > 0
    extr = Extrinsics.from_body_pose([0.2, 0.0, 1.2], [0.0, 0.5, 0.0])
    rect_cam = CameraModel.from_camera_info(info_msg)
    bottom = np.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, xyxy[:, 3]], axis=1)
    expect = rect_cam.pixel_to_ground(bottom, extr)
    for p, e, name in zip(g.positions, expect, names):
        assert p.class_id == name
        if np.all(np.isfinite(e)):
            assert p.valid
            np.testing.assert_allclose([p.position.x, p.position.y, p.position.z], e, atol=1e-6)
            assert abs(p.position.z) < 1e-9 and p.position.x > 0.2  # on the floor, ahead
        else:
            assert not p.valid


def test_one_pipeline_process_serves_several_cameras(harness, coco_bag):
    """cameras: [left, right] → one model, outputs per camera, headers preserved."""
    node = PerceptionNode("detector_node", context=harness.context, namespace="/robot",
                          parameter_overrides=[Parameter("cameras", value=["left", "right"])])
    harness.add_node(node)
    engines = {id(s.detector.engine) for s in node.pipeline.stages if s.name == "detect"}
    assert len(engines) == 1
    outs = {c: harness.subscribe(Detection2DArray, f"/robot/{c}/detections", RELIABLE)
            for c in ("left", "right")}
    pubs = {c: harness.publisher(Image, f"/robot/{c}/image_rect", BEST_EFFORT)
            for c in ("left", "right")}
    for p in pubs.values():
        assert harness.wait_matched(p)
    for i, msg in enumerate(coco_bag[:6]):
        cam = ("left", "right")[i % 2]
        n = len(outs[cam])
        pubs[cam].publish(msg)
        assert wait_for(lambda: len(outs[cam]) > n, 20)
    assert [len(outs["left"]), len(outs["right"])] == [3, 3]
    assert [o.header.stamp for o in outs["left"]] == [m.header.stamp for m in coco_bag[0:6:2]]
    assert [o.header.stamp for o in outs["right"]] == [m.header.stamp for m in coco_bag[1:6:2]]
    diag = node.diagnostics()
    assert diag["camera.left.frames_out"] == "3" and diag["camera.right.frames_out"] == "3"
