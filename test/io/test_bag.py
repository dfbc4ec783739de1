"""Bags: ``perception2d bag make/info/play/record``, ``perception2d rectify`` and io/bag_*.

Everything runs on the real chessboard images and calibration in test/data; play/record go
over real DDS (localhost, SHM profile from conftest) both in-process and via the CLI.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from perception2d_ros.cli.main import main
from perception2d_ros.io.bag_messages import image_to_numpy, stamp_to_ns
from perception2d_ros.io.bag_reader import BagReader
from perception2d_ros.io.bag_topics import bag_info
from perception2d_ros.io.bag_types import find_interface_dirs, make_typestore, register_msg_dir
from perception2d_ros.io.bag_writer import BagWriter
from perception2d_ros.geometry.camera import CameraModel

DATA = Path(__file__).resolve().parents[1] / "data"
CHESS = DATA / "chessboard"
PLUMB_BOB = DATA / "camera_info" / "left_plumb_bob.yaml"
HD_INFO = DATA / "camera_info" / "camerav1_1280x720.yaml"
SOURCES = sorted(CHESS.glob("left*.jpg"), key=lambda p: p.name)
START = "1700000000.25"
START_NS = 1_700_000_000_250_000_000
RATE = 10.0
PERIOD_NS = 100_000_000
IMAGE, INFO = "/camera/image_raw", "/camera/camera_info"
REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "perception2d_ros"]


def make(out: Path, *extra: str, info: Path = PLUMB_BOB) -> int:
    return main(["bag", "make", "--images", str(CHESS), "--camera-info", str(info),
                 "--frame-id", "left_cam", *extra, str(out)])


@pytest.fixture(scope="module")
def chess_bag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bags") / "chess.mcap"
    assert make(out, "--rate", str(RATE), "--start-time", START) == 0
    return out


def same_payloads(got: list[bytes], sent: list[bytes]) -> bool:
    """Received CDR equals sent CDR, byte for byte, in order.

    Between processes DDS carries payloads padded with zeros to a multiple of 4 bytes (RTPS
    alignment), so a recorded message may be the sent one plus up to 3 zero bytes (as with
    ``ros2 bag record``); nothing else may differ.
    """
    return len(got) == len(sent) and all(
        g == s or g == s + b"\0" * (-len(s) % 4) for g, s in zip(got, sent))


def raw_by_topic(path: Path) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    with BagReader(path) as reader:
        for topic, _type, _ts, raw in reader:
            out.setdefault(topic, []).append(raw)
    return out


# ------------------------------------------------------------------------------------- make
def test_make_mcap_content_via_rosbags(chess_bag: Path) -> None:
    assert len(SOURCES) == 13
    model = CameraModel.from_yaml(PLUMB_BOB)
    expected_info = model.to_camera_info_dict()
    with BagReader(chess_bag) as reader:
        topics = reader.topics
        assert {t: (m.msgtype, m.count) for t, m in topics.items()} == {
            IMAGE: ("sensor_msgs/msg/Image", 13), INFO: ("sensor_msgs/msg/CameraInfo", 13)}
        images, infos = [], []
        for topic, ts, msg in reader.decoded():
            (images if topic == IMAGE else infos).append((ts, msg))
    assert len(images) == len(infos) == 13
    for i, (src, (ts, img), (ts_info, info)) in enumerate(zip(SOURCES, images, infos)):
        want = START_NS + i * PERIOD_NS
        assert ts == ts_info == want
        assert stamp_to_ns(img.header.stamp) == stamp_to_ns(info.header.stamp) == want
        assert img.header.frame_id == info.header.frame_id == "left_cam"
        assert (img.encoding, img.width, img.height, img.step) == ("bgr8", 640, 480, 1920)
        assert img.is_bigendian == 0
        assert bytes(img.data) == cv2.imread(str(src)).tobytes(), src.name  # name order
        assert (info.width, info.height) == (640, 480)
        assert info.distortion_model == expected_info["distortion_model"] == "plumb_bob"
        for key in ("d", "k", "r", "p"):
            np.testing.assert_array_equal(getattr(info, key), expected_info[key])
        assert info.roi.do_rectify == expected_info["roi"]["do_rectify"]


def test_make_mcap_decodes_with_mcap_ros2(chess_bag: Path) -> None:
    from mcap_ros2.reader import read_ros2_messages

    messages = list(read_ros2_messages(str(chess_bag)))
    assert len(messages) == 26
    images = [m for m in messages if m.channel.topic == IMAGE]
    infos = [m for m in messages if m.channel.topic == INFO]
    assert [m.schema.name for m in images[:1] + infos[:1]] == [
        "sensor_msgs/msg/Image", "sensor_msgs/msg/CameraInfo"]
    stamps = [m.log_time_ns for m in images]
    assert np.all(np.diff(stamps) == PERIOD_NS)  # exact 10 Hz spacing
    assert stamps == [m.log_time_ns for m in infos]
    for src, m in zip(SOURCES, images):
        assert stamp_to_ns(m.ros_msg.header.stamp) == m.log_time_ns
        assert m.ros_msg.header.frame_id == "left_cam"
        np.testing.assert_array_equal(image_to_numpy(m.ros_msg), cv2.imread(str(src)))
    k = np.asarray(infos[0].ros_msg.k).reshape(3, 3)
    assert k[0, 0] == pytest.approx(536.0734331754204)


def test_make_sqlite3_directory_and_limit(tmp_path: Path) -> None:
    out = tmp_path / "chess_db"
    assert make(out, "--rate", "4", "--storage", "sqlite3", "--limit", "3",
                "--namespace", "stereo/left") == 0
    assert (out / "metadata.yaml").is_file() and (out / "chess_db.db3").is_file()
    info = bag_info(out)
    assert info["storage"] == "sqlite3"
    assert {t: v["count"] for t, v in info["topics"].items()} == {
        "/stereo/left/image_raw": 3, "/stereo/left/camera_info": 3}
    assert info["duration_ns"] == 2 * 250_000_000
    with BagReader(out) as reader:
        imgs = [msg for _, _, msg in reader.decoded(["/stereo/left/image_raw"])]
    for src, img in zip(SOURCES[:3], imgs):
        np.testing.assert_array_equal(image_to_numpy(img), cv2.imread(str(src)))
    # a single .db3 file also works, and a contradicting suffix is refused
    assert make(tmp_path / "one.db3", "--rate", "4", "--limit", "1") == 0
    assert bag_info(tmp_path / "one.db3")["message_count"] == 2
    assert make(tmp_path / "bad.mcap", "--rate", "4", "--storage", "sqlite3") == 1
    assert not (tmp_path / "bad.mcap").exists()


def test_make_from_video(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (640, 480))
    assert writer.isOpened()
    for src in SOURCES[:4]:
        writer.write(cv2.imread(str(src)))
    writer.release()
    out = tmp_path / "video.mcap"
    assert main(["bag", "make", "--video", str(video), "--camera-info", str(PLUMB_BOB),
                 "--frame-id", "cam", "--start-time", "10", str(out)]) == 0
    capture = cv2.VideoCapture(str(video))
    frames = [capture.read()[1] for _ in range(4)]
    capture.release()
    with BagReader(out) as reader:
        got = [(ts, msg) for _, ts, msg in reader.decoded([IMAGE])]
    assert [ts for ts, _ in got] == [10 * 10**9 + i * 200_000_000 for i in range(4)]  # 5 fps
    for frame, (_, msg) in zip(frames, got):
        np.testing.assert_array_equal(image_to_numpy(msg), frame)


def test_make_size_mismatch_and_resize(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.mcap"
    assert make(bad, "--rate", "10", info=HD_INFO) == 1
    err = capsys.readouterr().err
    assert "640x480" in err and "1280x720" in err and "--resize 1280x720" in err
    assert not bad.exists() and not list(tmp_path.iterdir())  # nothing left behind
    assert make(bad, "--rate", "10", "--resize", "800x600", info=HD_INFO) == 1
    assert "differs from the camera_info size" in capsys.readouterr().err
    good = tmp_path / "hd.mcap"
    assert make(good, "--rate", "10", "--resize", "1280x720", "--limit", "2", info=HD_INFO) == 0
    with BagReader(good) as reader:
        imgs = [msg for _, _, msg in reader.decoded([IMAGE])]
    assert len(imgs) == 2
    want = cv2.resize(cv2.imread(str(SOURCES[0])), (1280, 720), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(image_to_numpy(imgs[0]), want)
    assert make(good, "--rate", "10", info=PLUMB_BOB) == 1  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err


def test_info_cli(chess_bag: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bag", "info", str(chess_bag), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["storage"] == "mcap" and info["message_count"] == 26
    assert (info["start_ns"], info["end_ns"]) == (START_NS, START_NS + 12 * PERIOD_NS)
    assert info["duration_s"] == pytest.approx(1.2)
    assert info["topics"][IMAGE] == {"type": "sensor_msgs/msg/Image", "count": 13, "qos": [
        {"history": "keep_last", "depth": 5, "reliability": "best_effort",
         "durability": "volatile"}]}
    assert main(["bag", "info", str(chess_bag)]) == 0
    text = capsys.readouterr().out
    assert "1.200000000 s" in text and "sensor_msgs/msg/CameraInfo" in text
    assert "2023-11-14 22:13:20.250000 UTC" in text
    assert main(["bag", "info", str(chess_bag.parent / "missing.mcap")]) == 1


# ----------------------------------------------------------------------------------- bag API
def test_writer_is_atomic_and_validates(tmp_path: Path) -> None:
    out = tmp_path / "x.mcap"
    with pytest.raises(RuntimeError, match="boom"):
        with BagWriter(out) as bag:
            bag.add_topic("/a", "std_msgs/msg/String")
            bag.write("/a", 1, bag.typestore.types["std_msgs/msg/String"](data="hi"))
            raise RuntimeError("boom")
    assert not out.exists() and not list(tmp_path.iterdir())
    with BagWriter(out) as bag:
        with pytest.raises(KeyError, match="unknown"):
            bag.add_topic("/b", "nope_msgs/msg/Nope")
        with pytest.raises(ValueError, match="absolute"):
            bag.add_topic("relative", "std_msgs/msg/String")
        bag.add_topic("/a", "std_msgs/msg/String")
        with pytest.raises(KeyError, match="not added"):
            bag.write("/c", 1, b"")
        with pytest.raises(TypeError):
            bag.write("/a", 1, bag.typestore.types["std_msgs/msg/Bool"](data=True))
    with pytest.raises(FileExistsError):
        BagWriter(out).open()


def test_register_msg_dir_project_interfaces(tmp_path: Path) -> None:
    from mcap_ros2.reader import read_ros2_messages

    dirs = {p.name: p for p in find_interface_dirs(REPO)}
    if "vision_msgs" not in dirs:
        pytest.skip("interfaces/vision_msgs not present yet")
    typestore = make_typestore()
    names = register_msg_dir(typestore, dirs["vision_msgs"])
    assert "vision_msgs/msg/LabelInfo" in names and "vision_msgs/msg/Detection2DArray" in names
    label_info = typestore.types["vision_msgs/msg/LabelInfo"]
    vision_class = typestore.types["vision_msgs/msg/VisionClass"]
    header = typestore.types["std_msgs/msg/Header"](
        stamp=typestore.types["builtin_interfaces/msg/Time"](sec=1, nanosec=2), frame_id="cam")
    msg = label_info(header=header, class_map=[vision_class(class_id=3, class_name="car")],
                     threshold=0.5)
    out = tmp_path / "labels.mcap"
    with BagWriter(out, typestore=typestore) as bag:
        bag.add_topic("/det/label_info", "vision_msgs/msg/LabelInfo")
        bag.write("/det/label_info", 5, msg)
    assert bag_info(out)["topics"]["/det/label_info"]["qos"][0]["durability"] == "transient_local"
    (decoded,) = [m.ros_msg for m in read_ros2_messages(str(out))]  # schema is self-contained
    assert decoded.class_map[0].class_name == "car" and decoded.threshold == pytest.approx(0.5)
    with BagReader(out) as reader:  # a fresh typestore learns the type from the bag itself
        (_, _, again), = list(reader.decoded())
    assert again.class_map[0].class_id == 3
    with BagWriter(tmp_path / "auto.mcap") as bag:  # project types are found on demand
        bag.add_topic("/det/detections", "vision_msgs/msg/Detection2DArray")
    bad = tmp_path / "bad_msgs"
    (bad / "msg").mkdir(parents=True)
    (bad / "msg" / "Broken.msg").write_text("int32 x\nNoSuchType y\n")
    with pytest.raises(ValueError, match="unknown types"):
        register_msg_dir(make_typestore(), bad)


# ---------------------------------------------------------------------------------- rectify
def test_rectify_cli_matches_camera_model(tmp_path: Path) -> None:
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    png = src_dir / "left01.png"
    cv2.imwrite(str(png), cv2.imread(str(SOURCES[0])))
    jpg = SOURCES[1]
    out = tmp_path / "out"
    assert main(["rectify", "--camera-info", str(PLUMB_BOB), str(png), str(jpg),
                 "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["left01.png", jpg.name]
    model = CameraModel.from_yaml(PLUMB_BOB)
    want_png = model.rectify(cv2.imread(str(png), cv2.IMREAD_UNCHANGED))
    got_png = cv2.imread(str(out / "left01.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(got_png, want_png)  # lossless: exact
    assert not np.array_equal(got_png, cv2.imread(str(png)))  # it really changed the image
    ok, enc = cv2.imencode(".jpg", model.rectify(cv2.imread(str(jpg))),
                           [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    np.testing.assert_array_equal(cv2.imread(str(out / jpg.name)),
                                  cv2.imdecode(enc, cv2.IMREAD_COLOR))
    # wrong size and in-place outputs are refused
    assert main(["rectify", "--camera-info", str(HD_INFO), str(png), "-o", str(out)]) == 1
    assert main(["rectify", "--camera-info", str(PLUMB_BOB), str(png), "-o", str(src_dir)]) == 1


# ------------------------------------------------------------------------ play / record (DDS)
def _bag_with_label_info(chess_bag: Path, out: Path) -> Path:
    """The chessboard bag plus one latched std_msgs/String on /camera/label_info."""
    with BagReader(chess_bag) as reader, BagWriter(out) as bag:
        bag.add_topic("/camera/label_info", "std_msgs/msg/String")
        for topic, meta in reader.topics.items():
            bag.add_topic(topic, meta.msgtype)
        bag.write("/camera/label_info", START_NS,
                  bag.typestore.types["std_msgs/msg/String"](data="0: board"))
        for message in reader:
            bag.write(message.topic, message.timestamp_ns, message.rawdata)
    return out


@pytest.mark.ros
def test_play_record_round_trip_in_process(chess_bag: Path, tmp_path: Path) -> None:
    from perception2d_ros.ros.bag_play import play
    from perception2d_ros.ros.bag_record import record

    source = _bag_with_label_info(chess_bag, tmp_path / "in.mcap")
    topics = [IMAGE, INFO, "/camera/label_info"]
    out = tmp_path / "rec.mcap"
    ready, result, errors = threading.Event(), {}, []

    def run_record() -> None:
        try:
            result.update(record(out, topics, max_messages=27, duration=30.0,
                                 topic_timeout=20.0, on_ready=ready.set))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=run_record, daemon=True)
    thread.start()
    t0 = time.monotonic()
    counts = play(source, rate=2.0, wait_subscribers=1, wait_timeout=20.0)
    thread.join(timeout=30.0)
    assert not thread.is_alive() and not errors, errors
    assert counts == {"/camera/camera_info": 13, IMAGE: 13, "/camera/label_info": 1}
    assert result == counts
    assert time.monotonic() - t0 >= 0.6  # 1.2 s of bag at rate 2
    sent, got = raw_by_topic(source), raw_by_topic(out)
    for topic in topics:
        assert same_payloads(got[topic], sent[topic]), topic  # all, byte-identical, in order
    with BagReader(out) as reader:
        stamps = [m.timestamp_ns for m in reader.messages([IMAGE])]
        assert reader.topics["/camera/label_info"].qos[0].durability.name == "TRANSIENT_LOCAL"
    span = (stamps[-1] - stamps[0]) / 1e9
    assert 0.45 < span < 1.2, span  # recorded timing follows the bag scaled by rate 2 (0.6 s)


@pytest.mark.ros
def test_record_gets_latched_label_info_and_times_out(tmp_path: Path) -> None:
    import rclpy
    from std_msgs.msg import String

    from perception2d_ros.ros.bag_play import qos_for_topic, ros_node
    from perception2d_ros.ros.bag_record import record

    with ros_node("latched_talker") as node:
        pub = node.create_publisher(String, "/late/label_info", qos_for_topic("/late/label_info"))
        pub.publish(String(data="published before the recorder existed"))
        out = tmp_path / "late.mcap"
        counts = record(out, ["/late/label_info"], max_messages=1, duration=20.0,
                        topic_timeout=20.0)
    assert counts == {"/late/label_info": 1}
    with BagReader(out) as reader:
        (_, _, msg), = list(reader.decoded())
    assert msg.data == "published before the recorder existed"
    missing = tmp_path / "never.mcap"
    with pytest.raises(TimeoutError, match="/no/such/topic"):
        record(missing, ["/no/such/topic"], duration=1.0, topic_timeout=0.5)
    assert not missing.exists()
    assert not rclpy.ok()  # private contexts leave the default context untouched


@pytest.mark.ros
def test_play_wait_subscribers_times_out(chess_bag: Path) -> None:
    from perception2d_ros.ros.bag_play import play

    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="subscriber"):
        play(chess_bag, topics=["/camera/camera_info"], wait_subscribers=1, wait_timeout=0.5,
             ros_args=["-r", "/camera/camera_info:=/nobody_listens/camera_info"])
    assert time.monotonic() - t0 < 5.0


@pytest.mark.ros
def test_cli_record_and_play_subprocesses(chess_bag: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli_rec.mcap"
    env = dict(os.environ)
    recorder = subprocess.Popen(
        [*CLI, "bag", "record", "-o", str(out), IMAGE, INFO, "--messages", "26",
         "--duration", "40", "--topic-timeout", "30"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        player = subprocess.run(
            # reliable: the recorder adapts to the offered QoS, so no message may be lost
            # between the two processes even on a loaded machine
            [*CLI, "bag", "play", str(chess_bag), "--rate", "4", "--wait-subscribers", "1",
             "--wait-timeout", "30", "--reliable"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert player.returncode == 0, player.stderr
        assert "published 26 messages" in player.stdout
        rec_out, rec_err = recorder.communicate(timeout=30)
    finally:
        if recorder.poll() is None:
            recorder.kill()
            recorder.wait(timeout=10)
    assert recorder.returncode == 0, rec_err
    assert "recorded 26 messages" in rec_out
    got, sent = raw_by_topic(out), raw_by_topic(chess_bag)
    assert sorted(got) == sorted(sent) == [INFO, IMAGE]
    for topic in sent:
        assert same_payloads(got[topic], sent[topic]), topic
    with BagReader(out) as reader:  # the padded payloads still decode to the same message
        infos = [msg for _, _, msg in reader.decoded([INFO])]
    assert [stamp_to_ns(m.header.stamp) for m in infos] == [
        START_NS + i * PERIOD_NS for i in range(13)]
