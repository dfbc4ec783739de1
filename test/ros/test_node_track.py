"""The track stage as users run it: the separate-node chain bringup builds, track_node over
real rclpy pub/sub, and `perception2d process` with `stages: [detect, track]`, all on the
real Udacity highway clip (two cars in every frame)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from perception2d_ros.ros.bringup import node_list

REPO = Path(__file__).resolve().parents[2]
CLIP = REPO / "test" / "data" / "realcam" / "tracking" / "udacity_highway_640"
DEFAULT_YAML = REPO / "config" / "perception2d.yaml"
T0 = 1_700_000_000_000_000_000
PERIOD = 40_000_000   # 25 fps


def _params(tmp_path: Path, stages: list[str], **extra) -> Path:
    data = yaml.safe_load(DEFAULT_YAML.read_text())
    data["/**"]["ros__parameters"].update({"stages": stages, "detect.conf_threshold": 0.1,
                                           **extra})
    out = tmp_path / "params.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


@pytest.mark.parametrize("stages,chain", [
    (["rectify", "detect", "track"],
     {"detector_node": [("detections", "detections/raw")],
      "track_node": [("detections_in", "detections/raw")]}),
    (["rectify", "detect", "track", "sam", "clip"],
     {"detector_node": [("detections", "detections/raw")],
      "track_node": [("detections_in", "detections/raw"), ("detections", "detections/tracked")],
      "sam_node": [("detections_in", "detections/tracked")],
      "clip_node": [("detections_in", "detections/tracked")]}),
])
def test_separate_mode_chains_detector_tracker_and_consumers(tmp_path, stages, chain):
    specs = {s.kind: s for s in node_list(pipeline=False,
                                          params_file=_params(tmp_path, stages))}
    assert "track_node" in specs and specs["track_node"].overrides["stages"] == ["track"]
    for kind, remaps in chain.items():
        assert specs[kind].remappings == remaps, kind
    for kind in ("sam_node", "clip_node"):
        if kind in specs:  # they see the tracker's ids
            assert specs[kind].overrides["detections_in_tracked"] is True
    (pipe,) = node_list(pipeline=True, params_file=_params(tmp_path, stages))
    assert pipe.overrides["stages"] == stages


def _clip_frames() -> list[np.ndarray]:
    return [cv2.imread(str(p)) for p in sorted(CLIP.glob("*.jpg"))]


def _near_car_ids(frames_dets: list[list[tuple[str, list[float]]]]) -> dict[str, set[str]]:
    sides: dict[str, set[str]] = {"left": set(), "right": set()}
    for dets in frames_dets:
        for tid, (x1, y1, x2, y2) in dets:
            if y2 - y1 >= 30:
                sides["left" if (x1 + x2) / 2 < 490 else "right"].add(tid)
    return sides


def _xyxy(d) -> list[float]:
    c = d.bbox.center.position
    return [c.x - d.bbox.size_x / 2, c.y - d.bbox.size_y / 2, c.x + d.bbox.size_x / 2,
            c.y + d.bbox.size_y / 2]


@pytest.mark.ros
def test_track_node_publishes_stable_ids_from_detector_boxes():
    """Real detector boxes of each frame → detections_in → track_node → `detections` with
    Detection2D.id = track id: one id per car over the clip; class and header unchanged; a
    stamp jump back resets the tracks (new ids)."""
    pytest.importorskip("rclpy")
    from rclpy.parameter import Parameter
    from std_msgs.msg import Header
    from vision_msgs.msg import Detection2DArray

    from perception2d_ros.models.yolo.detector import YoloDetector
    from perception2d_ros.ros import conversions as conv
    from perception2d_ros.ros.perception_node import PerceptionNode
    from ros_harness import RELIABLE, RosHarness, wait_for

    det = YoloDetector.from_model("yolox_nano", conf=0.1, iou=0.45, max_det=100)
    inputs = []
    for i, img in enumerate(_clip_frames()):
        header = Header(stamp=conv.ns_to_stamp(T0 + i * PERIOD), frame_id="camera_optical")
        inputs.append(conv.detections_msg(det.detect(img), header))
    h = RosHarness()
    try:
        node = PerceptionNode("track_node", context=h.context, namespace="/camera",
                              parameter_overrides=[Parameter("track.min_hits", value=2)])
        h.add_node(node)
        out = h.subscribe(Detection2DArray, "/camera/detections", RELIABLE)
        pub = h.publisher(Detection2DArray, "/camera/detections_in", RELIABLE)
        assert h.wait_matched(pub)
        for msg in inputs:
            n = len(out)
            pub.publish(msg)
            assert wait_for(lambda: len(out) > n, 20), "no tracked detections for a frame"
        assert [o.header.stamp for o in out] == [m.header.stamp for m in inputs]
        assert out[0].detections == []            # min_hits 2: nothing on the first frame
        sides = _near_car_ids([[(d.id, _xyxy(d)) for d in o.detections] for o in out])
        assert all(len(v) == 1 for v in sides.values()) and sides["left"] != sides["right"]
        assert {d.results[0].hypothesis.class_id for o in out for d in o.detections} == {"car"}
        # the bag loops: stamps go back → this camera's tracks are reset, fresh ids
        n = len(out)
        for msg in inputs[:3]:
            k = len(out)
            pub.publish(msg)
            assert wait_for(lambda: len(out) > k, 20)
        again = {d.id for o in out[n:] for d in o.detections}
        assert again and not again & (sides["left"] | sides["right"])
    finally:
        h.close()


@pytest.mark.ros
def test_process_cli_tracks_the_clip(tmp_path):
    """`perception2d process` with stages [detect, track]: `detections` carry the track ids,
    each car one id over the bag; the command prints its summary and exits 0."""
    pytest.importorskip("rclpy")
    from perception2d_ros.io.bag_messages import image_msg
    from perception2d_ros.io.bag_reader import BagReader
    from perception2d_ros.io.bag_writer import BagWriter

    bag = tmp_path / "in.mcap"
    with BagWriter(bag) as w:
        w.add_topic("/camera/image_rect", "sensor_msgs/msg/Image")
        for i, img in enumerate(_clip_frames()):
            w.write("/camera/image_rect", T0 + i * PERIOD,
                    image_msg(w.typestore, img, T0 + i * PERIOD, "camera_optical"))
    out = tmp_path / "out.mcap"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "perception2d_ros", "process", str(bag), "-o",
                        str(out), "--params-file",
                        str(_params(tmp_path, ["detect", "track"]))],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "processed 38/38 frames" in r.stdout
    from rclpy.serialization import deserialize_message
    from vision_msgs.msg import Detection2DArray

    frames = []
    with BagReader(out) as reader:
        for m in reader.messages(topics=["/camera/detections"]):
            msg = deserialize_message(bytes(m.rawdata), Detection2DArray)
            frames.append([(d.id, _xyxy(d)) for d in msg.detections])
    assert len(frames) == 38
    sides = _near_car_ids(frames)
    assert all(len(v) == 1 for v in sides.values()) and sides["left"] != sides["right"]


@pytest.mark.ros
def test_process_cli_rejects_bad_track_parameter(tmp_path):
    """A bad track.* value is one clear line naming the parameter, no traceback (on a real
    bag: `process` checks the bag first)."""
    pytest.importorskip("rclpy")
    from perception2d_ros.io.bag_messages import image_msg
    from perception2d_ros.io.bag_writer import BagWriter

    bag = tmp_path / "in.mcap"
    with BagWriter(bag) as w:
        w.add_topic("/camera/image_rect", "sensor_msgs/msg/Image")
        w.write("/camera/image_rect", T0, image_msg(w.typestore, _clip_frames()[0], T0,
                                                    "camera_optical"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "perception2d_ros", "process", str(bag),
                        "-o", str(tmp_path / "o.mcap"), "--params-file",
                        str(_params(tmp_path, ["detect", "track"], **{"track.min_hits": 0}))],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "track.min_hits" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.ros
def test_track_node_tracks_each_camera_independently():
    """cameras: [left, right] in one track_node: the same boxes on both cameras get separate
    tracks (distinct ids, each stable); a frame_id change on one camera resets only that
    camera; /diagnostics-style counters report it."""
    pytest.importorskip("rclpy")
    from rclpy.parameter import Parameter
    from std_msgs.msg import Header
    from vision_msgs.msg import Detection2DArray

    from perception2d_ros.models.detections import Detections
    from perception2d_ros.ros import conversions as conv
    from perception2d_ros.ros.perception_node import PerceptionNode
    from ros_harness import RELIABLE, RosHarness, wait_for

    def msg(k: int, frame_id: str) -> Detection2DArray:
        det = Detections(np.array([[100 + 3 * k, 100, 160 + 3 * k, 180]], np.float32),
                         np.array([0.9], np.float32), np.array([0]), ["person"])
        return conv.detections_msg(det, Header(stamp=conv.ns_to_stamp(T0 + k * PERIOD),
                                               frame_id=frame_id))

    h = RosHarness()
    try:
        node = PerceptionNode("track_node", context=h.context, namespace="/robot",
                              parameter_overrides=[Parameter("cameras", value=["left", "right"]),
                                                   Parameter("track.min_hits", value=1)])
        h.add_node(node)
        outs, pubs = {}, {}
        for cam in ("left", "right"):
            outs[cam] = h.subscribe(Detection2DArray, f"/robot/{cam}/detections", RELIABLE)
            pubs[cam] = h.publisher(Detection2DArray, f"/robot/{cam}/detections_in", RELIABLE)
            assert h.wait_matched(pubs[cam])

        def send(cam: str, m: Detection2DArray) -> str:
            n = len(outs[cam])
            pubs[cam].publish(m)
            assert wait_for(lambda: len(outs[cam]) > n, 20)
            return outs[cam][-1].detections[0].id

        ids = {cam: {send(cam, msg(k, f"{cam}_optical")) for k in range(4)}
               for cam in ("left", "right")}
        assert all(len(v) == 1 for v in ids.values()) and ids["left"] != ids["right"]
        new_left = send("left", msg(4, "left_other"))       # frame_id change: left resets
        assert new_left not in ids["left"] | ids["right"]
        assert send("right", msg(4, "right_optical")) in ids["right"]   # right untouched
        diag = node.diagnostics()
        assert diag["track.resets"] == "1" and diag["track.active_tracks"] == "2"
    finally:
        h.close()


@pytest.mark.ros
@pytest.mark.parametrize("pipeline", ["false", "true"])
def test_bringup_cli_tracks_real_frames(tmp_path, pipeline):
    """`perception2d bringup --pipeline false|true` with `stages: [detect, track]`, as a user
    starts it (separate processes: detector_node → detections/raw → track_node → detections;
    or one pipeline_node): frames of the real clip in on image_raw, tracked detections out,
    each car one id."""
    pytest.importorskip("rclpy")
    import signal

    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image
    from std_msgs.msg import Header
    from vision_msgs.msg import Detection2DArray

    from perception2d_ros.ros import conversions as conv
    from ros_harness import RELIABLE, RosHarness, wait_for

    # the clip's calibration (derived from Udacity's chessboards, 1280x720) at 640x360;
    # pipeline_node's default input is image_raw + camera_info
    k = [1158.289 / 2, 0.0, 669.254 / 2, 0.0, 1153.618 / 2, 388.544 / 2, 0.0, 0.0, 1.0]
    info_fields = {"width": 640, "height": 360, "distortion_model": "plumb_bob",
                   "d": [-0.247337, -0.020100, -0.000691, 0.000092, 0.0], "k": k,
                   "r": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0],
                   "p": k[:3] + [0.0] + k[3:6] + [0.0] + k[6:] + [0.0]}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    params = _params(tmp_path, ["detect", "track"], image_reliability="reliable")
    proc = subprocess.Popen([sys.executable, "-m", "perception2d_ros", "bringup",
                             "--params-file", str(params), "--pipeline", pipeline,
                             "--log-level", "warn"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    h = RosHarness()
    try:
        out = h.subscribe(Detection2DArray, "/camera/detections", RELIABLE)
        pub = h.publisher(Image, "/camera/image_raw",
                          QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
        pub_info = h.publisher(CameraInfo, "/camera/camera_info",
                               QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
        assert h.wait_matched(pub, timeout=60), "bringup's nodes never subscribed image_raw"
        assert wait_for(lambda: h.node.count_publishers("/camera/detections") >= 1, 60)
        frames = _clip_frames()[:12]

        def send(img: np.ndarray, stamp: int) -> None:
            header = Header(stamp=conv.ns_to_stamp(stamp), frame_id="camera_optical")
            pub_info.publish(conv.camera_info_msg(info_fields, header))
            pub.publish(conv.array_to_image_msg(img, "bgr8", header))

        # warm-up: the first frame, earlier stamps, until the chain answers (matching between
        # the node processes, detector → track_node, may still be under way), then until no
        # late copy is still in flight
        for r in range(12):
            send(frames[0], T0 - 10 * PERIOD + r)
            if wait_for(lambda: len(out) > 0, 5):
                break
        assert out, "bringup's nodes never published detections"
        settled = -1
        while len(out) != settled:   # 2 s without a new output
            settled = len(out)
            wait_for(lambda: len(out) != settled, 2.0)
        start = len(out)
        for i, img in enumerate(frames):
            n = len(out)
            send(img, T0 + i * PERIOD)
            assert wait_for(lambda: len(out) > n, 30), f"no tracked detections for frame {i}"
        out = out[start:]
        assert [o.header.stamp for o in out] == [conv.ns_to_stamp(T0 + i * PERIOD)
                                                 for i in range(len(frames))]
        sides = _near_car_ids([[(d.id, _xyxy(d)) for d in o.detections] for o in out])
        assert all(len(v) == 1 for v in sides.values()) and sides["left"] != sides["right"]
    finally:
        h.close()
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert "Traceback" not in err, err[-2000:]
