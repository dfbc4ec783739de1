"""The inputs real robots record: compressed camera topics, ROS 1 bags, calibration files as
CameraInfo dumps.

Real data throughout: three frames of the Apollo front camera (raw, distorted 1920x1080 JPEGs)
and that camera's real calibration, a ROS 1 ``rostopic echo`` dump of its CameraInfo
(test/data/realcam, see ATTRIBUTION.md). ROS 1 bags are written at test time with
``rosbags.rosbag1.Writer`` and the ROS 1 Noetic message definitions, the way a ROS 1 robot
records them; the ROS 2 dump is printed with ``rosidl_runtime_py.message_to_yaml``, the
function ``ros2 topic echo`` prints with. CLI commands run as a user runs them (subprocess).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from perception2d_ros.io.bag_reader import BagReader, is_ros1_bag
from perception2d_ros.io.bag_topics import CameraTopics, bag_info, find_camera_topics, image_streams
from perception2d_ros.geometry.calibration import CALIBRATION_LAYOUTS
from perception2d_ros.geometry.camera import CameraModel
from perception2d_ros.io.image_codec import decode_compressed, encode_compressed

REPO = Path(__file__).resolve().parents[2]
APOLLO = Path(__file__).resolve().parents[1] / "data" / "realcam" / "apollo_obstacle"
FRAMES = sorted((APOLLO / "images").glob("*.jpg"))
ROS1_DUMP = APOLLO / "params" / "onsemi_obstacle_intrinsics.yaml"
PARSERS_YAML = Path(__file__).resolve().parents[1] / "data" / "camera_info" / "left_plumb_bob.yaml"
CLI = [sys.executable, "-m", "perception2d_ros"]
FRAME_ID = "onsemi_obstacle"
# the numbers of the real calibration (PROVENANCE.md of the Apollo data)
K_APOLLO = (2016.1823152047587, 968.7955597177738, 2006.9176811920593, 585.2762526609134)
D0_APOLLO = -0.5646406170350595
VEHICLES = {"car", "truck", "bus"}


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([*CLI, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def stamp_of_file(path: Path) -> int:
    return int(path.stem)  # Apollo names each frame by its stamp in ns


def ros2_dump_text(**extra: object) -> str:
    """What ``ros2 topic echo --once /camera_info`` prints for the Apollo calibration."""
    from rosidl_runtime_py import message_to_yaml
    from sensor_msgs.msg import CameraInfo

    d = yaml.safe_load(ROS1_DUMP.read_text())
    msg = CameraInfo(height=d["height"], width=d["width"], distortion_model=d["distortion_model"],
                     d=d["D"], k=d["K"], r=d["R"], p=d["P"], **extra)
    msg.header.frame_id = FRAME_ID
    return message_to_yaml(msg) + "---\n"  # echo ends every message with '---'


@pytest.fixture(scope="module")
def ros2_dump(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "camera_info_ros2.yaml"
    path.write_text(ros2_dump_text())
    return path


# ------------------------------------------------------------------------------ calibration
def test_ros1_camera_info_dump_loads_the_real_calibration() -> None:
    cam = CameraModel.from_yaml(ROS1_DUMP)
    assert cam.image_size == (1920, 1080) and cam.distortion_model == "plumb_bob"
    k = cam.k_full
    assert (k[0, 0], k[0, 2], k[1, 1], k[1, 2]) == K_APOLLO
    assert cam.d[0] == D0_APOLLO and not cam.is_identity


def test_ros2_dump_equals_ros1_dump(ros2_dump: Path) -> None:
    assert ros2_dump.read_text().rstrip().endswith("---")  # as echo prints it
    ros1, ros2 = CameraModel.from_yaml(ROS1_DUMP), CameraModel.from_yaml(ros2_dump)
    assert ros2.calibration_key == ros1.calibration_key
    assert ros2.frame_id == FRAME_ID


def test_dump_binning_and_roi_are_honoured(tmp_path: Path) -> None:
    path = tmp_path / "binned.yaml"
    path.write_text(ros2_dump_text(binning_x=2, binning_y=2))
    cam = CameraModel.from_yaml(path)
    assert cam.image_size == (960, 540)
    assert cam.k[0, 0] == pytest.approx(K_APOLLO[0] / 2)


def test_older_ros2_echo_array_text_is_read(tmp_path: Path) -> None:
    """Older ``ros2 topic echo`` printed double sequences as ``array('d', [...])``."""
    d = yaml.safe_load(ROS1_DUMP.read_text())
    doc = {"height": 1080, "width": 1920, "distortion_model": "plumb_bob",
           "d": f"array('d', {d['D']})", "k": d["K"], "r": d["R"], "p": d["P"]}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert CameraModel.from_yaml(path).calibration_key == \
        CameraModel.from_yaml(ROS1_DUMP).calibration_key


@pytest.mark.parametrize(("doc", "expect"), [
    ({"fx": 1.0, "fy": 2.0}, "unknown calibration layout (keys: fx, fy)"),
    ({"height": 1080, "width": 1920, "distortion_model": "plumb_bob", "K": [1] * 9, "D": [0] * 5,
      "R": [1, 0, 0, 0, 1, 0, 0, 0, 1]}, "missing key 'P' (a ROS 1 CameraInfo dump"),
    ({"height": 1080, "distortion_model": "plumb_bob", "k": [1] * 9},
     "missing key 'width' (a ROS 2 CameraInfo dump"),
    ({"height": 1080, "width": 1920, "distortion_model": "plumb_bob", "k": [1.0] * 8,
      "d": [], "r": [0.0] * 9, "p": [0.0] * 12}, "camera_info.k must have 9 elements"),
])
def test_bad_calibration_files_name_the_problem(tmp_path: Path, doc: dict, expect: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError) as err:
        CameraModel.from_yaml(path)
    assert expect in str(err.value) and str(path) in str(err.value)
    if "unknown" in expect:
        assert CALIBRATION_LAYOUTS in str(err.value)


def _as_png(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    out = dst_dir / f"{src.stem}.png"  # lossless, so the CLI output can be compared exactly
    cv2.imwrite(str(out), cv2.imread(str(src)))
    return out


@pytest.mark.parametrize("dump", ["ros1", "ros2"])
def test_rectify_cli_with_a_camera_info_dump(tmp_path: Path, ros2_dump: Path, dump: str) -> None:
    calib = ROS1_DUMP if dump == "ros1" else ros2_dump
    image = _as_png(FRAMES[0], tmp_path / "in")
    res = run_cli("rectify", "--camera-info", str(calib), str(image), "-o", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    got = cv2.imread(str(tmp_path / "out" / image.name))
    raw = cv2.imread(str(image))
    # the same rectification as the calibration built by hand from the dump's numbers
    d = yaml.safe_load(ROS1_DUMP.read_text())
    expected = CameraModel(1920, 1080, d["K"], d["D"], r=d["R"], p=d["P"]).rectify(raw)
    assert np.array_equal(got, expected)
    assert np.abs(got.astype(int) - raw).mean() > 10  # strong lens distortion was removed


def test_rectify_cli_unknown_layout_is_one_line(tmp_path: Path) -> None:
    calib = tmp_path / "intrinsics.yaml"
    calib.write_text("fx: 2016.2\nfy: 2006.9\ncx: 968.8\ncy: 585.3\n")
    image = _as_png(FRAMES[0], tmp_path / "in")
    res = run_cli("rectify", "--camera-info", str(calib), str(image), "-o", str(tmp_path / "out"))
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert "unknown calibration layout" in lines[0] and "ROS 1" in lines[0] \
        and "camera_calibration_parsers" in lines[0] and "ros2 topic echo" in lines[0]


# ------------------------------------------------------------------------- compressed images
@pytest.fixture(scope="module")
def frame0() -> np.ndarray:
    return cv2.imread(str(FRAMES[0]))


@pytest.mark.parametrize(("fmt", "codec", "order", "gray", "exact"), [
    ("jpeg", ".jpg", "bgr", False, False),                         # older publishers, drivers
    ("bgr8; jpeg compressed bgr8", ".jpg", "bgr", False, False),
    ("rgb8; jpeg compressed bgr8", ".jpg", "bgr", False, False),   # rgb8 camera, bgr8 inside
    ("mono8; jpeg compressed mono8", ".jpg", "bgr", True, False),
    ("png", ".png", "bgr", False, True),
    ("bgr8; png compressed bgr8", ".png", "bgr", False, True),
    ("rgb8; png compressed rgb8", ".png", "rgb", False, True),     # pixels stored in RGB order
    ("mono8; png compressed mono8", ".png", "bgr", True, True),
])
def test_decode_compressed_formats(frame0: np.ndarray, fmt: str, codec: str, order: str,
                                   gray: bool, exact: bool) -> None:
    src = cv2.cvtColor(frame0, cv2.COLOR_BGR2GRAY) if gray else frame0
    stored = src[:, :, ::-1] if order == "rgb" else src
    ok, buf = cv2.imencode(codec, np.ascontiguousarray(stored))
    assert ok
    image, encoding = decode_compressed(fmt, buf.tobytes())
    assert encoding == ("mono8" if gray else "bgr8")
    assert image.shape == src.shape
    diff = np.abs(image.astype(int) - src.astype(int)).mean()
    assert diff == 0 if exact else diff < 2.0  # jpeg: lossy, but the same picture


def test_encode_compressed_writes_image_transport_formats(frame0: np.ndarray) -> None:
    fmt, data = encode_compressed(frame0, "jpeg")
    assert fmt == "bgr8; jpeg compressed bgr8" and data[:2] == b"\xff\xd8"
    fmt, data = encode_compressed(cv2.cvtColor(frame0, cv2.COLOR_BGR2GRAY), "png")
    assert fmt == "mono8; png compressed mono8" and data[:4] == b"\x89PNG"


@pytest.mark.parametrize(("fmt", "data", "expect"), [
    ("jpeg", b"", "image.data is empty"),
    ("jpeg", "half", "truncated JPEG"),
    ("bgr8; png compressed bgr8", b"\x89PNG\r\n\x1a\n" + bytes(200), "cannot decode 208 bytes"),
    ("16UC1; compressedDepth png", b"\x00" * 16, "compressedDepth"),
])
def test_decode_compressed_bad_data_names_the_format(fmt: str, data: object,
                                                     expect: str) -> None:
    if data == "half":
        raw = FRAMES[0].read_bytes()
        data = raw[: len(raw) // 2]
    with pytest.raises(ValueError) as err:
        decode_compressed(fmt, data)
    assert expect in str(err.value)
    assert "image.format" in str(err.value) or "image.data" in str(err.value)
    assert fmt in str(err.value)


# ------------------------------------------------------------------------ finding the camera
IMG, CIMG, INFO = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage",
                   "sensor_msgs/msg/CameraInfo")


@pytest.mark.parametrize(("topics", "kwargs", "expect"), [
    # raw and compressed recorded side by side: raw wins (lossless, nothing to decode)
    ({"/cam/image_raw": IMG, "/cam/image_raw/compressed": CIMG, "/cam/camera_info": INFO}, {},
     CameraTopics("/cam/image_raw", "raw", "/cam/camera_info", "/cam")),
    ({"/cam/image_raw/compressed": CIMG, "/cam/camera_info": INFO}, {},
     CameraTopics("/cam/image_raw/compressed", "compressed", "/cam/camera_info", "/cam")),
    # a driver's own name (e.g. Apollo's .../image/compressed): found by its camera_info
    ({"/front_6mm/image/compressed": CIMG, "/front_6mm/camera_info": INFO, "/imu": "x/msg/I"},
     {}, CameraTopics("/front_6mm/image/compressed", "compressed", "/front_6mm/camera_info",
                      "/front_6mm")),
    ({"/a/image_raw/compressed": CIMG, "/a/camera_info": INFO, "/b/image_raw": IMG,
      "/b/camera_info": INFO}, {"namespace": "a"},
     CameraTopics("/a/image_raw/compressed", "compressed", "/a/camera_info", "/a")),
    # without a rectify stage: image_rect first (+ camera_info_rect), else image_raw
    ({"/c/image_raw": IMG, "/c/camera_info": INFO, "/c/image_rect": IMG,
      "/c/camera_info_rect": INFO}, {"rectified": True},
     CameraTopics("/c/image_rect", "raw", "/c/camera_info_rect", "/c")),
    ({"/c/image_raw/compressed": CIMG}, {"rectified": True},
     CameraTopics("/c/image_raw/compressed", "compressed", None, "/c")),
    ({"/c/image_raw": IMG, "/d/image/compressed": CIMG, "/d/camera_info": INFO},
     {"image_topic": "/d/image/compressed"},
     CameraTopics("/d/image/compressed", "compressed", "/d/camera_info", "/d")),
])
def test_find_camera_topics(topics: dict, kwargs: dict, expect: CameraTopics) -> None:
    assert find_camera_topics(topics, **kwargs) == expect


@pytest.mark.parametrize(("topics", "kwargs", "expect"), [
    ({"/imu": "sensor_msgs/msg/Imu"}, {}, "image topics in the bag: none"),
    ({"/x/image/compressed": CIMG}, {}, "image topics in the bag: /x/image/compressed"),
    ({"/a/image_raw": IMG, "/a/camera_info": INFO}, {"namespace": "/b"}, "in namespace /b"),
    ({"/a/image_raw": IMG}, {"image_topic": "/a/camera_info"}, "is not a sensor_msgs/Image"),
])
def test_find_camera_topics_errors(topics: dict, kwargs: dict, expect: str) -> None:
    with pytest.raises(ValueError) as err:
        find_camera_topics(topics, **kwargs)
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_image_streams_pair_compressed_topics_with_camera_info() -> None:
    streams = image_streams({"/l/image_raw/compressed": CIMG, "/l/camera_info": INFO,
                             "/r/image_raw": IMG, "/r/camera_info": INFO,
                             "/odd/compressed_thing": CIMG})
    assert [(s.image, s.transport, s.camera_info, s.base) for s in streams] == [
        ("/l/image_raw/compressed", "compressed", "/l/camera_info", "/l/image_raw"),
        ("/r/image_raw", "raw", "/r/camera_info", "/r/image_raw")]


# ------------------------------------------------------------------------------ bag make
@pytest.fixture(scope="module")
def jpeg_bag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``bag make --format jpeg`` from the real frames and the ROS 1 calibration dump."""
    out = tmp_path_factory.mktemp("bags") / "apollo_jpeg.mcap"
    res = run_cli("bag", "make", "--images", str(APOLLO / "images"), "--camera-info",
                  str(ROS1_DUMP), "--rate", "15", "--frame-id", FRAME_ID, "--format", "jpeg",
                  "--start-time", "1531984546.4", str(out))
    assert res.returncode == 0, res.stderr
    assert "/camera/image_raw/compressed" in res.stdout
    return out


def test_bag_make_jpeg_writes_compressed_images(jpeg_bag: Path, frame0: np.ndarray) -> None:
    with BagReader(jpeg_bag) as reader:
        assert {t: m.msgtype for t, m in reader.topics.items()} == {
            "/camera/image_raw/compressed": CIMG, "/camera/camera_info": INFO}
        msgs = list(reader.decoded())
    images = [m for t, _, m in msgs if t.endswith("compressed")]
    infos = [m for t, _, m in msgs if t.endswith("camera_info")]
    assert len(images) == len(infos) == len(FRAMES)
    assert {m.format for m in images} == {"bgr8; jpeg compressed bgr8"}
    first, encoding = decode_compressed(images[0].format, images[0].data)
    assert encoding == "bgr8" and np.abs(first.astype(int) - frame0).mean() < 2.0
    assert list(infos[0].k) == yaml.safe_load(ROS1_DUMP.read_text())["K"]
    assert [m.header.stamp for m in images] == [m.header.stamp for m in infos]


def test_bag_info_lists_the_compressed_camera(jpeg_bag: Path) -> None:
    res = run_cli("bag", "info", "--json", str(jpeg_bag))
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["cameras"] == [{"image": "/camera/image_raw/compressed",
                                "transport": "compressed", "camera_info": "/camera/camera_info",
                                "frames": 3, "format": "bgr8; jpeg compressed bgr8"}]
    text = run_cli("bag", "info", str(jpeg_bag)).stdout
    assert "Cameras:" in text and "compressed (bgr8; jpeg compressed bgr8), 3 frames" in text


# ------------------------------------------------------------------------------ ROS 1 bags
def write_ros1_bag(path: Path, frames: list[Path], *, ns: str = "/apollo/camera",
                   latched_info: bool = False) -> None:
    """A ROS 1 bag as a ROS 1 robot records it: the camera's own JPEG bytes as
    sensor_msgs/CompressedImage (format "jpeg") + its CameraInfo, header.seq counting."""
    from rosbags.rosbag1 import Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS1_NOETIC)
    t = ts.types
    calib = yaml.safe_load(ROS1_DUMP.read_text())
    with Writer(path) as bag:
        img_conn = bag.add_connection(f"{ns}/image_raw/compressed",
                                      "sensor_msgs/msg/CompressedImage", typestore=ts)
        info_conn = bag.add_connection(f"{ns}/camera_info", "sensor_msgs/msg/CameraInfo",
                                       typestore=ts, latching=int(latched_info))
        for seq, frame in enumerate(frames):
            stamp_ns = stamp_of_file(frame)
            header = t["std_msgs/msg/Header"](
                seq=seq, frame_id=FRAME_ID, stamp=t["builtin_interfaces/msg/Time"](
                    sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9))
            image = t["sensor_msgs/msg/CompressedImage"](
                header=header, format="jpeg",
                data=np.frombuffer(frame.read_bytes(), dtype=np.uint8))
            roi = t["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0,
                                                        width=0, do_rectify=False)
            info = t["sensor_msgs/msg/CameraInfo"](
                header=header, height=calib["height"], width=calib["width"],
                distortion_model=calib["distortion_model"],
                D=np.asarray(calib["D"], float), K=np.asarray(calib["K"], float),
                R=np.asarray(calib["R"], float), P=np.asarray(calib["P"], float),
                binning_x=0, binning_y=0, roi=roi)
            bag.write(info_conn, stamp_ns, ts.serialize_ros1(info, "sensor_msgs/msg/CameraInfo"))
            bag.write(img_conn, stamp_ns,
                      ts.serialize_ros1(image, "sensor_msgs/msg/CompressedImage"))


@pytest.fixture(scope="module")
def ros1_bag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ros1") / "apollo_front.bag"
    write_ros1_bag(path, FRAMES)
    return path


def test_ros1_bag_reads_as_ros2_messages(ros1_bag: Path) -> None:
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import CameraInfo, CompressedImage

    assert is_ros1_bag(ros1_bag)
    with BagReader(ros1_bag) as reader:
        assert reader.storage == "rosbag1"
        infos = list(reader.messages(["/apollo/camera/camera_info"]))
        images = list(reader.messages(["/apollo/camera/image_raw/compressed"]))
    assert len(infos) == len(images) == len(FRAMES)
    for i, frame in enumerate(FRAMES):
        info = deserialize_message(infos[i].rawdata, CameraInfo)  # rclpy: real ROS 2 CDR
        image = deserialize_message(images[i].rawdata, CompressedImage)
        assert infos[i].timestamp_ns == images[i].timestamp_ns == stamp_of_file(frame)
        for m in (info, image):
            assert m.header.frame_id == FRAME_ID
            assert m.header.stamp.sec * 10**9 + m.header.stamp.nanosec == stamp_of_file(frame)
        assert image.format == "jpeg" and bytes(image.data) == frame.read_bytes()
        assert (info.k[0], info.k[2], info.k[4], info.k[5]) == K_APOLLO
        assert info.d[0] == D0_APOLLO and info.width == 1920 and info.height == 1080


def test_ros1_bag_info_cli(ros1_bag: Path) -> None:
    res = run_cli("bag", "info", str(ros1_bag))
    assert res.returncode == 0, res.stderr
    assert "Storage:   rosbag1" in res.stdout and "Messages:  6" in res.stdout
    assert ("/apollo/camera/image_raw/compressed  compressed (jpeg), 3 frames, "
            "/apollo/camera/camera_info") in res.stdout
    info = bag_info(ros1_bag)
    assert info["start_ns"] == stamp_of_file(FRAMES[0])
    assert info["end_ns"] == stamp_of_file(FRAMES[-1])


def test_process_ros1_compressed_bag_gives_one_detection_array_per_frame(
        ros1_bag: Path, tmp_path: Path) -> None:
    """Done-when of issue 14: a ROS 1 bag with CompressedImage + CameraInfo of a real camera
    → ``perception2d process`` → one Detection2DArray per frame (in a ROS 2 MCAP)."""
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import CompressedImage, Image
    from vision_msgs.msg import Detection2DArray

    out = tmp_path / "processed.mcap"
    res = run_cli("process", str(ros1_bag), "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert f"processed {len(FRAMES)}/{len(FRAMES)} frames (0 rejected)" in res.stdout
    assert "/apollo/camera/image_raw/compressed (compressed)" in res.stderr
    assert not is_ros1_bag(out)
    with BagReader(out) as reader:
        assert reader.storage == "mcap"
        by_topic: dict[str, list] = {}
        for m in reader.messages():
            by_topic.setdefault(m.topic, []).append(m)
    stamps = [stamp_of_file(f) for f in FRAMES]
    dets = [deserialize_message(m.rawdata, Detection2DArray)
            for m in by_topic["/apollo/camera/detections"]]
    assert [d.header.stamp.sec * 10**9 + d.header.stamp.nanosec for d in dets] == stamps
    assert {d.header.frame_id for d in dets} == {FRAME_ID}
    for d in dets:  # the minivan ~30 m ahead is in every frame
        assert VEHICLES & {x.results[0].hypothesis.class_id for x in d.detections}, d
    rect = [deserialize_message(m.rawdata, Image) for m in by_topic["/apollo/camera/image_rect"]]
    assert [(r.width, r.height) for r in rect] == [(1920, 1080)] * len(FRAMES)
    # the input topic is kept, now as ROS 2 CDR
    inputs = [deserialize_message(m.rawdata, CompressedImage)
              for m in by_topic["/apollo/camera/image_raw/compressed"]]
    assert [bytes(i.data) for i in inputs] == [f.read_bytes() for f in FRAMES]


def test_process_refuses_a_ros1_output(ros1_bag: Path, tmp_path: Path) -> None:
    res = run_cli("process", str(ros1_bag), "-o", str(tmp_path / "out.bag"))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "ROS 1 .bag output is not supported" in res.stderr
    assert not (tmp_path / "out.bag").exists()


@pytest.mark.ros
def test_bag_play_ros1_bag_publishes_ros2_messages(ros1_bag: Path) -> None:
    from sensor_msgs.msg import CameraInfo, CompressedImage

    from perception2d_ros.ros.bag_play import play
    from ros_harness import RELIABLE, RosHarness, wait_for

    h = RosHarness()
    try:
        images = h.subscribe(CompressedImage, "/apollo/camera/image_raw/compressed", RELIABLE)
        infos = h.subscribe(CameraInfo, "/apollo/camera/camera_info", RELIABLE)
        counts = play(ros1_bag, rate=5.0, wait_subscribers=1, wait_timeout=20, reliable=True)
        assert counts == {"/apollo/camera/camera_info": 3,
                          "/apollo/camera/image_raw/compressed": 3}
        assert wait_for(lambda: len(images) == len(infos) == 3, 20)
    finally:
        h.close()
    assert [bytes(m.data) for m in images] == [f.read_bytes() for f in FRAMES]
    assert [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for m in infos] == \
        [stamp_of_file(f) for f in FRAMES]
    assert infos[0].k[0] == K_APOLLO[0]


@pytest.mark.ros
def test_bag_play_cli_plays_compressed_topics_unchanged(jpeg_bag: Path, tmp_path: Path) -> None:
    """``bag play`` (subprocess) of a compressed bag, recorded back by ``bag record``: the
    CompressedImage payloads arrive byte for byte."""
    out = tmp_path / "rec.mcap"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    topics = ["/camera/image_raw/compressed", "/camera/camera_info"]
    recorder = subprocess.Popen([*CLI, "bag", "record", "-o", str(out), *topics, "--messages",
                                 "6", "--duration", "60", "--topic-timeout", "40"],
                                cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        player = run_cli("bag", "play", str(jpeg_bag), "--rate", "5", "--wait-subscribers", "1",
                         "--wait-timeout", "40", "--reliable", timeout=90)
        assert player.returncode == 0, player.stderr
        rec_out, rec_err = recorder.communicate(timeout=40)
    finally:
        if recorder.poll() is None:
            recorder.kill()
            recorder.wait(timeout=10)
    assert recorder.returncode == 0, rec_err
    with BagReader(out) as got, BagReader(jpeg_bag) as sent:
        recv = [m.data.tobytes() for _, _, m in got.decoded(["/camera/image_raw/compressed"])]
        orig = [m.data.tobytes() for _, _, m in sent.decoded(["/camera/image_raw/compressed"])]
    assert recv == orig and len(orig) == 3


# ------------------------------------------------------------------- nodes: image_transport
def _ros_stamp(ns: int):
    from builtin_interfaces.msg import Time

    return Time(sec=ns // 10**9, nanosec=ns % 10**9)


def _compressed(frame: Path, stamp_ns: int, fmt: str = "jpeg", data: bytes | None = None):
    from sensor_msgs.msg import CompressedImage

    msg = CompressedImage(format=fmt)
    msg.header.stamp = _ros_stamp(stamp_ns)
    msg.header.frame_id = FRAME_ID
    msg.data = data if data is not None else frame.read_bytes()
    return msg


def _camera_info(stamp_ns: int):
    from perception2d_ros.ros import conversions as conv

    header = conv.Header(stamp=_ros_stamp(stamp_ns), frame_id=FRAME_ID)
    return conv.camera_info_msg(CameraModel.from_yaml(ROS1_DUMP).to_camera_info_dict(), header)


@pytest.mark.ros
def test_pipeline_node_with_compressed_transport(capfd: pytest.CaptureFixture) -> None:
    """pipeline_node with ``image_transport: compressed`` over real pub/sub: it subscribes to
    ``image_raw/compressed`` (following a remapping of ``image_raw``, as image_transport
    does), decodes each JPEG and publishes one Detection2DArray and one image_rect per frame
    with the input header. A corrupt frame is one throttled error naming the topic and the
    format; the next frame is served."""
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import CameraInfo, CompressedImage, Image
    from vision_msgs.msg import Detection2DArray

    from perception2d_ros.ros.perception_node import PerceptionNode
    from ros_harness import RELIABLE, RosHarness, wait_for

    topic = "/car/front/image/compressed"
    h = RosHarness()
    try:
        node = PerceptionNode(
            "pipeline_node", context=h.context, namespace="/camera",
            parameter_overrides=[Parameter("image_transport", value="compressed")],
            cli_args=["--ros-args", "-r", "image_raw:=/car/front/image"])
        h.add_node(node)
        assert node.cams[0].input_topic == topic
        dets = h.subscribe(Detection2DArray, "/camera/detections", RELIABLE)
        rects = h.subscribe(Image, "/camera/image_rect", RELIABLE)
        pub_img = h.publisher(CompressedImage, topic, RELIABLE)
        pub_info = h.publisher(CameraInfo, "/camera/camera_info", RELIABLE)
        assert h.wait_matched(pub_img) and h.wait_matched(pub_info)
        assert wait_for(lambda: h.node.count_publishers("/camera/detections") >= 1, 10)

        def send(frame: Path, stamp: int, **kw: object) -> None:
            pub_info.publish(_camera_info(stamp))
            pub_img.publish(_compressed(frame, stamp, **kw))

        for frame in FRAMES:  # lockstep: each frame's output before the next (no drops)
            n = len(dets)
            send(frame, stamp_of_file(frame))
            assert wait_for(lambda: len(dets) > n, 60), dict(node.errors.counts)
        stamps = [stamp_of_file(f) for f in FRAMES]
        assert [d.header.stamp.sec * 10**9 + d.header.stamp.nanosec for d in dets] == stamps
        assert {d.header.frame_id for d in dets} == {FRAME_ID}
        assert all(VEHICLES & {x.results[0].hypothesis.class_id for x in d.detections}
                   for d in dets)
        assert wait_for(lambda: len(rects) == len(FRAMES), 10)
        assert {(r.width, r.height, r.encoding) for r in rects} == {(1920, 1080, "bgr8")}

        # two corrupt frames: counted twice, logged once (throttled), nothing published
        capfd.readouterr()
        half = FRAMES[0].read_bytes()[:100_000]
        out_before = node.frames_out
        for i, fmt in enumerate(("jpeg", "bgr8; jpeg compressed bgr8")):
            send(FRAMES[0], stamps[-1] + (i + 1) * 10**9, fmt=fmt, data=half)
            assert wait_for(lambda: node.errors.counts.get("image.format", 0) == i + 1, 30)
        # the next good frame is served
        n = len(dets)
        send(FRAMES[1], stamps[-1] + 5 * 10**9)
        assert wait_for(lambda: len(dets) > n, 60)
        assert node.frames_out == out_before + 1
        err = capfd.readouterr().err
        logged = [ln for ln in err.splitlines() if "image.format" in ln]
        assert len(logged) == 1, err[-2000:]
        assert "[ERROR]" in logged[0] and topic in logged[0] and "'jpeg'" in logged[0] \
            and "truncated JPEG" in logged[0]
    finally:
        h.close()


def test_bringup_image_transport_goes_to_camera_facing_nodes_only(tmp_path: Path) -> None:
    from perception2d_ros.ros.bringup import node_list

    params = tmp_path / "p.yaml"
    params.write_text("/**:\n  ros__parameters:\n    stages: [rectify, detect, clip]\n"
                      "    image_transport: compressed\n")
    (pipe,) = node_list(pipeline=True, params_file=params, image_transport="compressed")
    assert pipe.overrides["image_transport"] == "compressed"
    # None: the params file decides for camera-facing nodes; nodes fed by rectify_node read
    # its raw image_rect whatever the params file says
    sep = {s.kind: s.overrides for s in node_list(pipeline=False, params_file=params)}
    assert "image_transport" not in sep["rectify_node"]
    assert sep["detector_node"]["image_transport"] == "raw"
    assert sep["clip_node"]["image_transport"] == "raw"
    sep = {s.kind: s.overrides
           for s in node_list(pipeline=False, params_file=params, image_transport="raw")}
    assert sep["rectify_node"]["image_transport"] == "raw"
    # without rectify, the detector reads the camera itself
    params.write_text("/**:\n  ros__parameters:\n    stages: [detect]\n")
    (det,) = node_list(pipeline=False, params_file=params, image_transport="compressed")
    assert det.kind == "detector_node" and det.overrides["image_transport"] == "compressed"


def test_ros1_bag_with_a_corrupt_message_is_a_clear_error(tmp_path: Path) -> None:
    from rosbags.rosbag1 import Writer
    from rosbags.typesys import Stores, get_typestore

    path = tmp_path / "corrupt.bag"
    with Writer(path) as bag:
        conn = bag.add_connection("/cam/camera_info", "sensor_msgs/msg/CameraInfo",
                                  typestore=get_typestore(Stores.ROS1_NOETIC))
        bag.write(conn, 1, b"\x00" * 17)  # far too short for a CameraInfo
    with BagReader(path) as reader, pytest.raises(ValueError) as err:
        list(reader.messages())
    assert "cannot convert a ROS 1 sensor_msgs/msg/CameraInfo message" in str(err.value)


@pytest.mark.ros
def test_image_transport_parameter_is_validated() -> None:
    from perception2d_ros.ros.node_params import check_parameter

    assert check_parameter("image_transport", "compressed") is None
    assert check_parameter("image_transport", "raw") is None
    assert check_parameter("image_transport", "theora") == \
        "image_transport: 'theora' must be one of raw, compressed"


@pytest.mark.ros
def test_demo_on_a_ros1_compressed_bag_in_separate_nodes(ros1_bag: Path, tmp_path: Path) -> None:
    """``make demo BAG=drive.bag`` (what it runs) on the ROS 1 compressed bag, one node per
    stage: rectify_node decodes ``image_raw/compressed``, detector_node reads its raw
    ``image_rect``; every frame comes out. Reliable image QoS end to end, so that a loaded
    machine may not lose a frame between processes (as test_bringup's demo runs)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env["ROS_DOMAIN_ID"] = str(151 + int(env.get("ROS_DOMAIN_ID", "0")) % 80)
    data = yaml.safe_load((REPO / "config" / "perception2d.yaml").read_text())
    data["/**"]["ros__parameters"]["image_reliability"] = "reliable"
    params = tmp_path / "params_reliable.yaml"
    params.write_text(yaml.safe_dump(data))
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "perception2d_ros.demo.run", "--bag", str(ros1_bag),
                          "--out", str(out), "--params-file", str(params), "--pipeline",
                          "false", "--timeout", "120"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "3 frames on /apollo/camera/image_raw/compressed" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_in"] == summary["frames_out"] == summary["image_rect"] == 3
    assert VEHICLES & set(summary["detections_per_class"])
