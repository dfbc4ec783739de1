"""rectify_node over real rclpy pub/sub with frames from a bag of the OpenCV chessboards."""
from __future__ import annotations

import array
import logging

import cv2
import numpy as np
import pytest

pytest.importorskip("rclpy", reason="node tests need rclpy (installed by `make test`)")

from rclpy.parameter import Parameter  # noqa: E402
from rclpy.serialization import deserialize_message  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402

from perception2d_ros.io.bag_messages import camera_info_msg, image_msg  # noqa: E402
from perception2d_ros.io.bag_reader import BagReader  # noqa: E402
from perception2d_ros.io.bag_writer import BagWriter  # noqa: E402
from perception2d_ros.geometry.camera import CameraModel  # noqa: E402
from perception2d_ros.ros.perception_node import PerceptionNode  # noqa: E402
from ros_harness import BEST_EFFORT, RELIABLE, RosHarness, wait_for  # noqa: E402

pytestmark = pytest.mark.ros


@pytest.fixture(scope="module")
def chessboard_bag(tmp_path_factory, data_dir):
    """A bag made from the 13 real chessboard images + their calibration (10 Hz)."""
    path = tmp_path_factory.mktemp("bags") / "chessboard.mcap"
    cam = CameraModel.from_yaml(data_dir / "camera_info" / "left_plumb_bob.yaml")
    info = cam.to_camera_info_dict()
    files = sorted((data_dir / "chessboard").glob("left*.jpg"))
    with BagWriter(path) as bag:
        bag.add_topic("/camera/image_raw", "sensor_msgs/msg/Image")
        bag.add_topic("/camera/camera_info", "sensor_msgs/msg/CameraInfo")
        for i, f in enumerate(files):
            ts = 1_700_000_000_000_000_000 + i * 100_000_000
            img = cv2.imread(str(f))
            bag.write("/camera/image_raw", ts, image_msg(bag.typestore, img, ts, "camera_optical"))
            bag.write("/camera/camera_info", ts, camera_info_msg(bag.typestore, info, ts,
                                                                 "camera_optical"))
    return path


def bag_pairs(path):
    out = {}
    with BagReader(path) as reader:
        for m in reader.messages():
            kind = Image if m.topic.endswith("image_raw") else CameraInfo
            msg = deserialize_message(bytes(m.rawdata), kind)
            out.setdefault(m.timestamp_ns, {})[kind] = msg
    return [(v[Image], v[CameraInfo]) for _, v in sorted(out.items())]


@pytest.fixture()
def harness():
    h = RosHarness()
    yield h
    h.close()


def start_node(h, kind="rectify_node", **params):
    overrides = [Parameter(k, value=v) for k, v in params.items()]
    node = PerceptionNode(kind, context=h.context, namespace="/camera",
                          parameter_overrides=overrides)
    h.add_node(node)
    return node


def lockstep(h, node, pairs, out_topic="/camera/image_rect", timeout=20.0):
    """Publish each pair and wait for its output before the next (no newest-wins drops)."""
    pub_img = h.publisher(Image, "/camera/image_raw", BEST_EFFORT)
    pub_info = h.publisher(CameraInfo, "/camera/camera_info", BEST_EFFORT)
    outs = h.subscribe(Image, out_topic, BEST_EFFORT)
    assert h.wait_matched(pub_img) and h.wait_matched(pub_info)
    assert wait_for(lambda: h.node.count_publishers(out_topic) >= 1, 10)
    for img, info in pairs:
        before = len(outs)
        errors = lambda: sum(node.errors.counts.values())  # noqa: E731
        done_before, errors_before = node.frames_out, errors()
        pub_info.publish(info)
        pub_img.publish(img)
        assert wait_for(lambda: node.frames_out > done_before or errors() > errors_before,
                        timeout), "node produced neither an output nor an error"
        if node.frames_out > done_before:
            assert wait_for(lambda: len(outs) > before, timeout), "output not received"
    return outs


def test_rectify_node_replays_bag_exactly(harness, chessboard_bag, data_dir):
    pairs = bag_pairs(chessboard_bag)
    assert len(pairs) == 13
    node = start_node(harness)
    infos = harness.subscribe(CameraInfo, "/camera/camera_info_rect", BEST_EFFORT)
    outs = lockstep(harness, node, pairs)
    assert wait_for(lambda: len(outs) == len(pairs) and len(infos) == len(pairs), 5)
    cam = CameraModel.from_yaml(data_dir / "camera_info" / "left_plumb_bob.yaml")
    for (img_in, _), out in zip(pairs, outs):
        assert out.header.stamp == img_in.header.stamp
        assert out.header.frame_id == img_in.header.frame_id == "camera_optical"
        assert (out.width, out.height, out.encoding) == (640, 480, "bgr8")
        src = np.frombuffer(bytes(img_in.data), np.uint8).reshape(480, 640, 3)
        got = np.frombuffer(bytes(out.data), np.uint8).reshape(480, 640, 3)
        np.testing.assert_array_equal(got, cam.rectify(src))
        assert not np.array_equal(got, src)  # the lens distortion was really removed
    rect = infos[0]
    assert list(rect.d) in ([], [0.0] * 5) and rect.r[0] == 1.0
    np.testing.assert_allclose(np.array(rect.k).reshape(3, 3), cam.p[:3, :3])
    assert node.slot.dropped == 0 and node.frames_out == 13


def _bad(img: Image, **changes) -> Image:
    msg = Image(header=img.header, height=img.height, width=img.width, encoding=img.encoding,
                is_bigendian=img.is_bigendian, step=img.step, data=img.data)
    for k, v in changes.items():
        setattr(msg, k, v)
    return msg


def test_rectify_node_survives_bad_input_and_keeps_serving(harness, chessboard_bag, caplog):
    pairs = bag_pairs(chessboard_bag)[:4]
    good_img, good_info = pairs[0]
    k0 = CameraInfo(header=good_info.header, width=good_info.width, height=good_info.height,
                    distortion_model=good_info.distortion_model, d=good_info.d,
                    k=[0.0] * 9, r=good_info.r, p=good_info.p)
    seq = [
        pairs[0],
        (_bad(pairs[1][0], step=100), pairs[1][1]),                 # step < width * 3
        (_bad(pairs[2][0], encoding="fancy42"), pairs[2][1]),       # unknown encoding
        (_bad(pairs[3][0], data=bytes(1000)), pairs[3][1]),         # data too short
    ]
    node = start_node(harness)
    outs = lockstep(harness, node, seq)
    # K = 0 (uncalibrated) with a good image of a new stamp
    img5, _ = bag_pairs(chessboard_bag)[5]
    k0.header = img5.header
    outs2 = lockstep(harness, node, [(img5, k0)])
    img6, info6 = bag_pairs(chessboard_bag)[6]
    lockstep(harness, node, [(img6, info6)])
    assert wait_for(lambda: node.frames_out == 2, 5), node.errors.counts
    counts = node.errors.counts
    assert sum(counts.values()) == 4, counts
    joined = " ".join(counts)
    for field in ("step", "encoding", "data", "k"):
        assert field in joined, (field, counts)
    assert outs is outs2 or True
    diag = node.diagnostics()
    assert diag["frames_out"] == "2"
    assert any(k.startswith("errors.") for k in diag)


def test_missing_camera_info_is_reported_and_recovers(harness, chessboard_bag):
    pairs = bag_pairs(chessboard_bag)
    node = start_node(harness)
    pub_img = harness.publisher(Image, "/camera/image_raw", BEST_EFFORT)
    outs = harness.subscribe(Image, "/camera/image_rect", BEST_EFFORT)
    assert harness.wait_matched(pub_img)
    for img, _ in pairs[:5]:
        n = node.frames_in
        pub_img.publish(img)
        assert wait_for(lambda: node.frames_in > n, 10)
    assert wait_for(lambda: node.errors.counts.get("camera_info", 0) >= 1, 10), (node.frames_in, dict(node.errors.counts))
    assert outs == []
    # camera_info arrives: the next synced frame is served
    lockstep(harness, node, [pairs[12]])
    assert wait_for(lambda: len(outs) >= 1, 10)
