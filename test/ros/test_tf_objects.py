"""Extrinsics from TF and 3D objects on the real Apollo front camera.

The car's real calibration and camera-in-lidar extrinsics (test/data/realcam/apollo_obstacle)
with a base_link under the lidar: the HDL-64 sits on the roof; its height above the road is
not in the data set, so it is ASSUMED here to be LIDAR_HEIGHT = 1.9 m (roof-mounted HDL-64 on
a sedan; the camera then is 1.57 m above the road). Everything else is real: frames, stamps,
intrinsics, extrinsics, and the hand-annotated 2D boxes of det_gt.txt.

* core: the minivan ahead (det_gt row 0 of each frame) is about 30 m away, its distance
  changes smoothly, its size is a minivan's;
* ``perception2d process`` on a bag with /tf_static (base_link -> velodyne64 -> camera) and
  ``extrinsics.source: tf`` gives detections/ground and detections/objects equal to the
  same extrinsics given as parameters; also with the lidar link on /tf (interpolated);
  a bag missing a link processes every frame, skips ground/objects and names the link;
* a live pipeline_node with real rclpy pub/sub does the same from /tf_static published by
  a transient-local publisher, and skips ground positions until the chain is complete.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from perception2d_ros.geometry.camera import CameraModel
from perception2d_ros.geometry.extrinsics import BODY_TO_OPTICAL, Extrinsics
from perception2d_ros.geometry.objects3d import lift_objects

REPO = Path(__file__).resolve().parents[2]
APOLLO = REPO / "test" / "data" / "realcam" / "apollo_obstacle"
LIDAR_HEIGHT = 1.9  # ASSUMED height of the roof HDL-64 above the road (not in the data)
CAM_FRAME = "onsemi_obstacle"


def _extrinsics_yaml() -> tuple[list[float], list[float]]:
    d = yaml.safe_load((APOLLO / "params" / "onsemi_obstacle_extrinsics.yaml").read_text())
    t, q = d["transform"]["translation"], d["transform"]["rotation"]
    return [t["x"], t["y"], t["z"]], [q["x"], q["y"], q["z"], q["w"]]


CAM_T, CAM_Q = _extrinsics_yaml()


def _camera() -> CameraModel:
    """The ROS 1 CameraInfo dump (uppercase K/D/R/P) of the real calibration."""
    y = yaml.safe_load((APOLLO / "params" / "onsemi_obstacle_intrinsics.yaml").read_text())
    return CameraModel(y["width"], y["height"], y["K"], y["D"], r=y["R"], p=y["P"],
                       distortion_model=y["distortion_model"])


def _camera_in_base() -> Extrinsics:
    return Extrinsics.from_quaternion(np.add(CAM_T, [0.0, 0.0, LIDAR_HEIGHT]), CAM_Q,
                                      parent_frame="base_link")


def _obstacle_camera_gt() -> dict[int, np.ndarray]:
    """det_gt.txt rows of this camera (det_gt interleaves two cameras; test.txt names each
    stamp's camera): stamp -> (N, 4) xyxy raw pixels; row 0 = the minivan ahead."""
    ours = {int(line.split("/")[1]) for line in (APOLLO / "test.txt").read_text().split()
            if line.startswith(CAM_FRAME + "/")}
    tokens = (APOLLO / "det_gt.txt").read_text().split()
    out, i = {}, 0
    while i < len(tokens):
        stamp, n = int(tokens[i]), int(tokens[i + 1])
        rows = np.array(tokens[i + 2:i + 2 + 5 * n], float).reshape(n, 5)
        if stamp in ours:
            out[stamp] = np.stack([rows[:, 0], rows[:, 1], rows[:, 0] + rows[:, 2],
                                   rows[:, 1] + rows[:, 3]], 1)
        i += 2 + 5 * n
    assert set(_apollo_stamps()) <= set(out)
    return out


def _apollo_stamps() -> list[int]:
    return sorted(int(p.stem) for p in (APOLLO / "images").glob("*.jpg"))


def test_minivan_ahead_is_about_30m_and_moves_smoothly():
    cam, extr = _camera(), _camera_in_base()
    gt = _obstacle_camera_gt()
    dist, sizes = [], []
    for stamp in sorted(gt):
        obj = lift_objects(gt[stamp][:1], cam, extr)   # raw-image boxes
        assert obj.source == ["ground_plane"]
        dist.append(obj.distance[0])
        sizes.append(obj.size[0])
    dist, sizes = np.array(dist), np.array(sizes)
    assert len(dist) == 21
    assert np.all((dist > 25) & (dist < 35)), dist
    assert np.median(dist) == pytest.approx(30, abs=3)
    # 15 Hz: a car ahead in traffic; box bottoms are annotated to a pixel (~0.5 m at 30 m)
    assert np.abs(np.diff(dist)).max() < 2.5, np.diff(dist)
    # a minivan: about 1.9 m wide, 1.7-1.9 m tall
    assert np.all((sizes[:, 1] > 1.6) & (sizes[:, 1] < 2.2)), sizes[:, 1]
    assert np.all((sizes[:, 2] > 1.5) & (sizes[:, 2] < 2.1)), sizes[:, 2]


@pytest.mark.parametrize("key,value,match", [
    ("extrinsics.source", "lidar", "extrinsics.source: 'lidar' is not one of params, tf"),
    ("extrinsics.tf_timeout_s", -1.0, "extrinsics.tf_timeout_s: -1.0 must be >= 0"),
    ("depth_topic", 3, "depth_topic: 3 must be a topic name string"),
])
def test_config_errors_name_the_parameter(key, value, match):
    from perception2d_ros.pipeline.config import merge_config, validate_config

    group, _, name = key.rpartition(".")
    cfg = merge_config({group: {name: value}} if group else {name: value})
    with pytest.raises(ValueError, match=match):
        validate_config(cfg)


# ------------------------------------------------------------------------------ bags
def _tf_msg(ts, transforms: list[tuple[str, str, list[float], list[float]]], stamp_ns: int):
    T = ts.types
    Time = T["builtin_interfaces/msg/Time"]
    return T["tf2_msgs/msg/TFMessage"](transforms=[
        T["geometry_msgs/msg/TransformStamped"](
            header=T["std_msgs/msg/Header"](
                stamp=Time(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9), frame_id=parent),
            child_frame_id=child,
            transform=T["geometry_msgs/msg/Transform"](
                translation=T["geometry_msgs/msg/Vector3"](x=t[0], y=t[1], z=t[2]),
                rotation=T["geometry_msgs/msg/Quaternion"](x=q[0], y=q[1], z=q[2], w=q[3])))
        for parent, child, t, q in transforms])


LIDAR_LINK = ("base_link", "velodyne64", [0.0, 0.0, LIDAR_HEIGHT], [0.0, 0.0, 0.0, 1.0])
CAMERA_LINK = ("velodyne64", CAM_FRAME, CAM_T, CAM_Q)


DEPTH_M = 25.0  # the synthetic depth given to the minivan's pixels (metres)


def _depth_image(stamp: int) -> np.ndarray:
    """16UC1 depth registered to the raw image: the minivan's GT box at DEPTH_M, no return
    (0) elsewhere, so every other object falls back to the ground plane."""
    depth = np.zeros((1080, 1920), np.uint16)
    x1, y1, x2, y2 = np.round(_obstacle_camera_gt()[stamp][0]).astype(int)
    depth[y1:y2, x1:x2] = int(DEPTH_M * 1000)
    return depth


def _make_bag(path: Path, static: list, dynamic: list | None = None, n: int = 3,
              depth: bool = False) -> Path:
    from perception2d_ros.io.bag_messages import camera_info_msg, image_msg
    from perception2d_ros.io.bag_writer import BagWriter

    cam = _camera()
    stamps = _apollo_stamps()[:n]
    with BagWriter(path) as bag:
        for topic, kind in (("/camera/image_raw", "sensor_msgs/msg/Image"),
                            ("/camera/camera_info", "sensor_msgs/msg/CameraInfo"),
                            ("/tf_static", "tf2_msgs/msg/TFMessage"),
                            ("/tf", "tf2_msgs/msg/TFMessage"),
                            ("/camera/depth/image_raw", "sensor_msgs/msg/Image")):
            if depth or "depth" not in topic:
                bag.add_topic(topic, kind)
        if static:
            bag.write("/tf_static", stamps[0] - 10**6, _tf_msg(bag.typestore, static, stamps[0]))
        if dynamic:  # 20 Hz around the frames: each frame lies between two samples
            for k, ts in enumerate(range(stamps[0] - 50_000_000, stamps[-1] + 100_000_000,
                                         50_000_000)):
                bag.write("/tf", ts, _tf_msg(bag.typestore, dynamic, ts))
        for ts in stamps:
            img = cv2.imread(str(APOLLO / "images" / f"{ts}.jpg"))
            bag.write("/camera/camera_info", ts,
                      camera_info_msg(bag.typestore, cam.to_camera_info_dict(), ts, CAM_FRAME))
            bag.write("/camera/image_raw", ts, image_msg(bag.typestore, img, ts, CAM_FRAME))
            if depth and ts != stamps[1]:  # frame 1 has no depth: it must not wait forever
                bag.write("/camera/depth/image_raw", ts + 2_000_000, image_msg(
                    bag.typestore, _depth_image(ts), ts + 2_000_000, CAM_FRAME, "16UC1"))
    return path


def _params(path: Path, source: str, **extra) -> Path:
    params = {"stages": ["rectify", "detect"], "extrinsics.enabled": True, **extra,
              "extrinsics.source": source, "extrinsics.parent_frame": "base_link",
              "extrinsics.plane_height": 0.0}
    if source == "params":  # the same pose as parameters: body orientation, URDF style
        e = _camera_in_base()
        body = Extrinsics("base_link", e.translation, e.rotation @ BODY_TO_OPTICAL.T)
        params["extrinsics.translation"] = [float(v) for v in e.translation]
        params["extrinsics.rotation_quaternion"] = [float(v) for v in body.quaternion_xyzw]
    path.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
    return path


def _read_outputs(path: Path) -> dict[str, list]:
    from rclpy.serialization import deserialize_message
    from perception2d_interfaces.msg import GroundPositionArray
    from vision_msgs.msg import Detection2DArray, Detection3DArray

    from perception2d_ros.io.bag_reader import BagReader

    types = {"/camera/detections": Detection2DArray,
             "/camera/detections/ground": GroundPositionArray,
             "/camera/detections/objects": Detection3DArray}
    out: dict[str, list] = {t: [] for t in types}
    with BagReader(path) as reader:
        for m in reader.messages(topics=[t for t in types if t in reader.topics]):
            out[m.topic].append(deserialize_message(bytes(m.rawdata), types[m.topic]))
    return out


def _ground_array(msgs) -> np.ndarray:
    return np.array([[p.position.x, p.position.y, p.position.z, p.valid]
                     for g in msgs for p in g.positions])


def _objects_array(msgs) -> np.ndarray:
    rows = []
    for a in msgs:
        for d in a.detections:
            c, s, o = d.bbox.center.position, d.bbox.size, d.bbox.center.orientation
            rows.append([c.x, c.y, c.z, s.x, s.y, s.z, o.z, o.w])
    return np.array(rows)


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfbags")
    n = len(_apollo_stamps())  # the frames in test/data (3)
    return {"static": _make_bag(d / "static.mcap", [LIDAR_LINK, CAMERA_LINK], n=n),
            "dynamic": _make_bag(d / "dynamic.mcap", [CAMERA_LINK], [LIDAR_LINK], n=n),
            "missing": _make_bag(d / "missing.mcap", [CAMERA_LINK], n=3),
            "depth": _make_bag(d / "depth.mcap", [LIDAR_LINK, CAMERA_LINK], n=3, depth=True)}


@pytest.fixture(scope="module")
def processed(bags, tmp_path_factory):
    """process over the same frames: params in-process, tf from the CLI as users run it."""
    from perception2d_ros.ros.bringup import pipeline_config
    from perception2d_ros.cli.process import process_bag

    d = tmp_path_factory.mktemp("tfout")
    out = {}
    process_bag(bags["static"], d / "params.mcap",
                pipeline_config(_params(d / "p.yaml", "params")), progress=False)
    out["params"] = _read_outputs(d / "params.mcap")
    tf_yaml = _params(d / "t.yaml", "tf")
    for name in ("static", "dynamic", "missing"):
        res = subprocess.run([sys.executable, "-m", "perception2d_ros", "process",
                              str(bags[name]), "-o", str(d / f"{name}.mcap"),
                              "--params-file", str(tf_yaml)],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        out[name] = _read_outputs(d / f"{name}.mcap")
        out[name + "_stderr"] = res.stderr
    return out


def test_process_tf_static_equals_the_same_extrinsics_as_parameters(processed):
    ref = processed["params"]
    n = len(_apollo_stamps())
    assert n >= 3
    assert len(ref["/camera/detections"]) == n
    assert len(ref["/camera/detections/ground"]) == n
    assert len(ref["/camera/detections/objects"]) == n
    for name in ("static", "dynamic"):
        got = processed[name]
        assert len(got["/camera/detections/ground"]) == n, name
        assert len(got["/camera/detections/objects"]) == n, name
        for a, b in zip(got["/camera/detections/ground"], ref["/camera/detections/ground"]):
            assert a.header == b.header and a.header.frame_id == "base_link"
        np.testing.assert_allclose(_ground_array(got["/camera/detections/ground"]),
                                   _ground_array(ref["/camera/detections/ground"]), atol=1e-6)
        np.testing.assert_allclose(_objects_array(got["/camera/detections/objects"]),
                                   _objects_array(ref["/camera/detections/objects"]),
                                   atol=1e-6)
    assert "frames: base_link, onsemi_obstacle, velodyne64" in processed["static_stderr"]


def test_process_bag_missing_a_link_skips_ground_and_names_it(processed):
    got, err = processed["missing"], processed["missing_stderr"]
    assert len(got["/camera/detections"]) == 3          # every frame still detected
    assert got["/camera/detections/ground"] == [] and got["/camera/detections/objects"] == []
    lines = [ln for ln in err.splitlines() if "missing link between 'base_link' and "
             "'velodyne64'" in ln]
    assert 1 <= len(lines) < 3, err[-2000:]             # throttled: not one per frame
    assert "Traceback" not in err


def test_process_objects_minivan_distance_with_the_detector(processed):
    """The real detector's boxes: the minivan's object is ~30 m ahead in every frame and its
    distance changes smoothly; every object carries its 2D detection's id and class."""
    cam = _camera()
    gt = _obstacle_camera_gt()
    dets = processed["static"]["/camera/detections"]
    objs = processed["static"]["/camera/detections/objects"]
    dist = []
    for d2, d3 in zip(dets, objs):
        stamp = d2.header.stamp.sec * 10**9 + d2.header.stamp.nanosec
        x1, y1, x2, y2 = gt[stamp][0]
        # the GT box is in raw pixels; the detector saw the rectified image
        (rx1, ry1), (rx2, ry2) = cam.undistort_points([[x1, y1], [x2, y2]])
        best, best_iou = None, 0.0
        for det in d2.detections:
            c, sx, sy = det.bbox.center.position, det.bbox.size_x, det.bbox.size_y
            ix = max(0.0, min(rx2, c.x + sx / 2) - max(rx1, c.x - sx / 2))
            iy = max(0.0, min(ry2, c.y + sy / 2) - max(ry1, c.y - sy / 2))
            inter = ix * iy
            iou = inter / ((rx2 - rx1) * (ry2 - ry1) + sx * sy - inter)
            if iou > best_iou:
                best, best_iou = det, iou
        assert best_iou > 0.5, f"frame {stamp}: no detection on the minivan"
        obj = next(o for o in d3.detections if o.id == best.id)
        assert obj.results[0].hypothesis.class_id == best.results[0].hypothesis.class_id
        assert obj.results[-1].hypothesis.class_id == "position:ground_plane"
        assert d3.header.frame_id == "base_link"
        dist.append(float(np.hypot(obj.bbox.center.position.x - _camera_in_base().translation[0],
                                   obj.bbox.center.position.y)))
    dist = np.array(dist)
    assert np.all((dist > 25) & (dist < 35)), dist
    assert np.abs(np.diff(dist)).max() < 2.5, dist


def _minivan_object(cam, d2, d3):
    """The Detection3D of the detection that matches the GT minivan box (IoU > 0.5)."""
    stamp = d2.header.stamp.sec * 10**9 + d2.header.stamp.nanosec
    x1, y1, x2, y2 = _obstacle_camera_gt()[stamp][0]
    (rx1, ry1), (rx2, ry2) = cam.undistort_points([[x1, y1], [x2, y2]])
    best, best_iou = None, 0.0
    for det in d2.detections:
        c, sx, sy = det.bbox.center.position, det.bbox.size_x, det.bbox.size_y
        ix = max(0.0, min(rx2, c.x + sx / 2) - max(rx1, c.x - sx / 2))
        iy = max(0.0, min(ry2, c.y + sy / 2) - max(ry1, c.y - sy / 2))
        iou = ix * iy / ((rx2 - rx1) * (ry2 - ry1) + sx * sy - ix * iy)
        if iou > best_iou:
            best, best_iou = det, iou
    assert best_iou > 0.5, f"frame {stamp}: no detection on the minivan"
    return next(o for o in d3.detections if o.id == best.id)


def test_process_depth_topic_gives_the_minivan_its_depth(bags, tmp_path):
    """Aligned 16UC1 depth (paired by stamp, 2 ms apart): the minivan's object comes from the
    depth in its box, the others from the ground plane; a frame without depth falls back."""
    from perception2d_ros.ros.bringup import pipeline_config
    from perception2d_ros.cli.process import process_bag

    cfg = pipeline_config(_params(tmp_path / "d.yaml", "tf", depth_topic="depth/image_raw"))
    stats = process_bag(bags["depth"], tmp_path / "out.mcap", cfg, progress=False,
                        debug_image=True)
    assert stats["frames_out"] == 3
    out = _read_outputs(tmp_path / "out.mcap")
    from perception2d_ros.io.bag_reader import BagReader

    with BagReader(tmp_path / "out.mcap") as reader:   # the debug image shows distances
        assert reader.topics["/camera/debug_image"].count == 3
        assert reader.topics["/camera/depth/image_raw"].count == 2  # copied to the output
    cam, c = _camera(), _camera_in_base().translation
    sources = []
    for d2, d3 in zip(out["/camera/detections"], out["/camera/detections/objects"]):
        obj = _minivan_object(cam, d2, d3)
        src = obj.results[-1].hypothesis
        sources.append(src.class_id)
        dist = float(np.hypot(obj.bbox.center.position.x - c[0],
                              obj.bbox.center.position.y - c[1]))
        if src.class_id == "position:depth_box":
            assert src.score == pytest.approx(1.0)      # every central pixel had depth
            assert dist == pytest.approx(DEPTH_M, abs=0.5)  # optical depth ~ range ahead
        else:
            assert 27 < dist < 33                        # ground plane, as without depth
        others = [o.results[-1].hypothesis.class_id for o in d3.detections if o is not obj]
        assert set(others) <= {"position:ground_plane", "position:depth_box"}
    assert sources == ["position:depth_box", "position:ground_plane", "position:depth_box"]


# --------------------------------------------------------------------------- live node
@pytest.mark.ros
def test_live_node_extrinsics_from_tf_static_equal_parameters():
    pytest.importorskip("rclpy", reason="node tests need rclpy (installed by `make test`)")
    from rclpy.parameter import Parameter
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import CameraInfo, Image
    from tf2_msgs.msg import TFMessage
    from vision_msgs.msg import Detection2DArray, Detection3DArray
    from perception2d_interfaces.msg import GroundPositionArray

    from perception2d_ros.io.bag_messages import camera_info_msg, image_msg
    from perception2d_ros.io.bag_types import make_typestore
    from perception2d_ros.ros.perception_node import PerceptionNode

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ros_harness import LATCHED, RELIABLE, RosHarness, wait_for

    store = make_typestore()
    cam = _camera()
    stamps = _apollo_stamps()[:2]

    def ros_msg(rosbags_msg, kind, cls):
        return deserialize_message(bytes(store.serialize_cdr(rosbags_msg, kind)), cls)

    frames = [(ros_msg(image_msg(store, cv2.imread(str(APOLLO / "images" / f"{ts}.jpg")), ts,
                                 CAM_FRAME), "sensor_msgs/msg/Image", Image),
               ros_msg(camera_info_msg(store, cam.to_camera_info_dict(), ts, CAM_FRAME),
                       "sensor_msgs/msg/CameraInfo", CameraInfo)) for ts in stamps]
    tf_static = ros_msg(_tf_msg(store, [LIDAR_LINK, CAMERA_LINK], 0),
                        "tf2_msgs/msg/TFMessage", TFMessage)
    e = _camera_in_base()
    body = Extrinsics("base_link", e.translation, e.rotation @ BODY_TO_OPTICAL.T)
    common = [Parameter("stages", value=["rectify", "detect"]),
              Parameter("extrinsics.enabled", value=True),
              Parameter("extrinsics.parent_frame", value="base_link"),
              Parameter("image_reliability", value="reliable")]
    h = RosHarness()
    try:
        nodes = {
            "tf": PerceptionNode("pipeline_node", context=h.context, namespace="/tfcam",
                                 parameter_overrides=common + [
                                     Parameter("extrinsics.source", value="tf")]),
            "params": PerceptionNode("pipeline_node", context=h.context, namespace="/pcam",
                                     parameter_overrides=common + [
                                         Parameter("extrinsics.source", value="params"),
                                         Parameter("extrinsics.translation",
                                                   value=[float(v) for v in e.translation]),
                                         Parameter("extrinsics.rotation_quaternion",
                                                   value=[float(v) for v in
                                                          body.quaternion_xyzw])])}
        got = {}
        pubs = {}
        for name, node in nodes.items():
            h.add_node(node)
            ns = f"/{'tfcam' if name == 'tf' else 'pcam'}"
            got[name] = {k: h.subscribe(t, f"{ns}/detections{k}", RELIABLE) for k, t in
                         (("", Detection2DArray), ("/ground", GroundPositionArray),
                          ("/objects", Detection3DArray))}
            pubs[name] = (h.publisher(Image, f"{ns}/image_raw", RELIABLE),
                          h.publisher(CameraInfo, f"{ns}/camera_info", RELIABLE))
            assert all(h.wait_matched(p) for p in pubs[name])

        def play(i: int) -> None:
            for name in nodes:
                img, info = frames[i]
                pubs[name][1].publish(info)
                pubs[name][0].publish(img)

        # frame 0 before any TF: detections, but no ground / objects from the tf node
        play(0)
        assert wait_for(lambda: all(len(got[n][""]) == 1 for n in nodes), 60)
        assert wait_for(lambda: len(got["params"]["/ground"]) == 1, 10)
        assert got["tf"]["/ground"] == [] and got["tf"]["/objects"] == []
        assert any(k == "tf" for k in nodes["tf"].errors.counts)
        # robot_state_publisher style: one latched TFMessage on /tf_static
        tf_pub = h.publisher(TFMessage, "/tf_static", LATCHED)
        tf_pub.publish(tf_static)
        assert wait_for(lambda: "base_link" in nodes["tf"].runner.tf_buffer.frames, 20)
        play(1)
        assert wait_for(lambda: all(len(got[n]["/objects"]) >= 1 for n in nodes)
                        and len(got["tf"]["/ground"]) == 1 and len(got["params"]["/ground"]) == 2,
                        60)
        a, b = got["tf"]["/ground"][0], got["params"]["/ground"][1]
        assert a.header == b.header and a.header.frame_id == "base_link"
        assert len(a.positions) > 0
        np.testing.assert_allclose(_ground_array([a]), _ground_array([b]), atol=1e-6)
        np.testing.assert_allclose(_objects_array([got["tf"]["/objects"][-1]]),
                                   _objects_array([got["params"]["/objects"][-1]]), atol=1e-6)
    finally:
        h.close()


@pytest.mark.ros
def test_live_node_depth_topic_32fc1():
    """A live pipeline_node with depth_topic: the depth image (32FC1, metres) published a
    little after its frame is paired by stamp and gives the minivan its depth."""
    pytest.importorskip("rclpy", reason="node tests need rclpy (installed by `make test`)")
    from rclpy.parameter import Parameter
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import CameraInfo, Image
    from vision_msgs.msg import Detection2DArray, Detection3DArray

    from perception2d_ros.io.bag_messages import camera_info_msg, image_msg
    from perception2d_ros.io.bag_types import make_typestore
    from perception2d_ros.ros.perception_node import PerceptionNode

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ros_harness import RELIABLE, RosHarness, wait_for

    store = make_typestore()
    cam = _camera()
    ts = _apollo_stamps()[0]

    def ros_msg(rosbags_msg, kind, cls):
        return deserialize_message(bytes(store.serialize_cdr(rosbags_msg, kind)), cls)

    img = ros_msg(image_msg(store, cv2.imread(str(APOLLO / "images" / f"{ts}.jpg")), ts,
                            CAM_FRAME), "sensor_msgs/msg/Image", Image)
    info = ros_msg(camera_info_msg(store, cam.to_camera_info_dict(), ts, CAM_FRAME),
                   "sensor_msgs/msg/CameraInfo", CameraInfo)
    depth = ros_msg(image_msg(store, _depth_image(ts).astype(np.float32) / 1000.0, ts + 3_000_000,
                              CAM_FRAME, "32FC1"), "sensor_msgs/msg/Image", Image)
    e = _camera_in_base()
    body = Extrinsics("base_link", e.translation, e.rotation @ BODY_TO_OPTICAL.T)
    h = RosHarness()
    try:
        node = h.add_node(PerceptionNode("pipeline_node", context=h.context, namespace="/cam",
                                         parameter_overrides=[
            Parameter("stages", value=["rectify", "detect"]),
            Parameter("image_reliability", value="reliable"),
            Parameter("depth_topic", value="depth/image_raw"),
            Parameter("extrinsics.enabled", value=True),
            Parameter("extrinsics.translation", value=[float(v) for v in e.translation]),
            Parameter("extrinsics.rotation_quaternion",
                      value=[float(v) for v in body.quaternion_xyzw])]))
        dets = h.subscribe(Detection2DArray, "/cam/detections", RELIABLE)
        objs = h.subscribe(Detection3DArray, "/cam/detections/objects", RELIABLE)
        pubs = [h.publisher(t, f"/cam/{n}", RELIABLE) for t, n in
                ((Image, "depth/image_raw"), (CameraInfo, "camera_info"), (Image, "image_raw"))]
        assert all(h.wait_matched(p) for p in pubs)
        # a depth image of an older stamp (the stream is live), then the frame's own depth,
        # both received before the frame: the pairing is then independent of how fast this
        # (possibly busy) machine moves an 8 MB image within the live wait of 2 x slop
        old = ros_msg(image_msg(store, np.zeros((1080, 1920), np.float32), ts - 10**9,
                                CAM_FRAME, "32FC1"), "sensor_msgs/msg/Image", Image)
        pubs[0].publish(old)
        pubs[0].publish(depth)
        assert wait_for(lambda: node.cams[0].depth is not None
                        and len(node.cams[0].depth._secondary) == 2, 20)
        pubs[1].publish(info)
        pubs[2].publish(img)
        assert wait_for(lambda: len(objs) == 1 and len(dets) == 1, 60)
        obj = _minivan_object(cam, dets[0], objs[0])
        assert obj.results[-1].hypothesis.class_id == "position:depth_box"
        c = e.translation
        assert float(np.hypot(obj.bbox.center.position.x - c[0],
                              obj.bbox.center.position.y - c[1])) == pytest.approx(DEPTH_M,
                                                                                  abs=0.5)
    finally:
        h.close()


@pytest.mark.ros
def test_node_refuses_a_bad_extrinsics_source():
    pytest.importorskip("rclpy", reason="node tests need rclpy (installed by `make test`)")
    from perception2d_ros.ros.node_params import check_parameter

    assert check_parameter("extrinsics.source", "tf") is None
    assert check_parameter("extrinsics.source", "lidar") == \
        "extrinsics.source: 'lidar' must be one of params, tf"


@pytest.mark.ros
def test_bag_play_with_tf_into_a_live_node(bags):
    """As a user runs it: `perception2d bag play` of a bag with /tf_static (latched) and the
    lidar link on /tf, into a live pipeline_node with extrinsics.source tf."""
    pytest.importorskip("rclpy", reason="node tests need rclpy (installed by `make test`)")
    import os

    from rclpy.parameter import Parameter
    from perception2d_interfaces.msg import GroundPositionArray
    from vision_msgs.msg import Detection3DArray

    from perception2d_ros.ros.perception_node import PerceptionNode

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ros_harness import RELIABLE, RosHarness, wait_for

    h = RosHarness()
    try:
        node = h.add_node(PerceptionNode("pipeline_node", context=h.context, namespace="/camera",
                                         parameter_overrides=[
            Parameter("stages", value=["rectify", "detect"]),
            Parameter("image_reliability", value="reliable"),
            Parameter("extrinsics.enabled", value=True),
            Parameter("extrinsics.source", value="tf"),
            Parameter("extrinsics.tf_timeout_s", value=2.0)]))
        ground = h.subscribe(GroundPositionArray, "/camera/detections/ground", RELIABLE)
        objs = h.subscribe(Detection3DArray, "/camera/detections/objects", RELIABLE)
        # rate 0.2: the CPU detector keeps up, so newest-wins drops nothing
        player = subprocess.run(
            [sys.executable, "-m", "perception2d_ros", "bag", "play", str(bags["dynamic"]),
             "--rate", "0.2", "--wait-subscribers", "1", "--wait-timeout", "30", "--reliable"],
            cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=120)
        assert player.returncode == 0, player.stderr
        n = len(_apollo_stamps())
        assert wait_for(lambda: len(ground) == n and len(objs) == n, 60), \
            (len(ground), len(objs), dict(node.errors.counts))
        assert {g.header.frame_id for g in ground} == {"base_link"}
        assert "base_link" in node.runner.tf_buffer.frames
    finally:
        h.close()
