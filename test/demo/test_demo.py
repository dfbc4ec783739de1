"""`make demo`: the embedded real sequence (Apollo front camera), its TF chain and ground truth,
the GT check, and the demo run the way a user runs it (bag play -> nodes -> bag record)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from perception2d_ros.geometry.camera import CameraModel
from perception2d_ros.demo.sequence import (compose, gt_recall, load_sequence,
                                                 map_boxes_raw_to_rect, read_ground_truth)

REPO = Path(__file__).resolve().parents[2]
SEQ = REPO / "data" / "demo" / "apollo_obstacle"


@pytest.fixture(scope="module")
def seq():
    return load_sequence()


def test_sequence_is_the_real_apollo_camera(seq):
    assert len(seq.images) == 21 and seq.stamps == sorted(seq.stamps)
    assert 14.0 < seq.rate_hz < 16.0  # about 15 Hz, from the real stamps
    info = seq.camera_info
    assert (info["width"], info["height"]) == (1920, 1080)
    assert info["d"][0] == pytest.approx(-0.5646406170350595)  # the ROS 1 dump, read as is
    cam = CameraModel.from_camera_info(info)
    # strong barrel distortion: the raw corner pixel, undistorted and projected with the
    # same K, lands about 260 px away
    ray = cam.pixel_to_ray([[0.0, 0.0]])[0]
    k = np.asarray(info["k"], np.float64).reshape(3, 3)
    corner = (k @ (ray / ray[2]))[:2]
    assert 230 < np.hypot(*corner) < 290


def test_tf_chain_puts_the_camera_forward_and_level(seq):
    assert [(t.parent, t.child) for t in seq.tf_static] == [
        ("base_link", "velodyne64"), ("velodyne64", "onsemi_obstacle")]
    e = seq.extrinsics()
    forward = e.rotation[:, 2]  # optical z in base_link
    assert forward[0] > 0.999  # looks along +x
    assert e.translation[2] == pytest.approx(1.5, abs=1e-3)  # the stated assumption
    # compose() refuses a chain that does not connect
    with pytest.raises(ValueError, match="no TF link"):
        compose(seq.tf_static, "base_link", "map")


def test_ground_truth_rows_of_this_camera_only(seq):
    gt = read_ground_truth(seq.ground_truth, seq.stamps)
    assert sorted(gt) == seq.stamps  # the other camera's interleaved rows are left out
    assert all(b.shape == (2, 5) for b in gt.values())
    first = gt[seq.stamps[0]]
    np.testing.assert_allclose(first[0], [1073, 560, 1215, 692, 0])  # x y w h -> xyxy


@pytest.mark.parametrize("dets,expected", [
    ({}, 0.0),                                                      # nothing detected
    ({1: (np.array([[0, 0, 10, 10]]), ["car"], np.array([0.9]))}, 1.0),
    ({1: (np.array([[0, 0, 10, 10]]), ["person"], np.array([0.9]))}, 0.0),  # not a vehicle
    ({1: (np.array([[5, 5, 15, 15]]), ["car"], np.array([0.9]))}, 0.0),     # IoU 1/7
    ({1: (np.array([[0, 0, 10, 10], [0, 0, 10, 11]]), ["car", "truck"],
          np.array([0.5, 0.9]))}, 1.0),                            # one GT, matched once
])
def test_gt_recall_table(dets, expected):
    gt = {1: np.array([[0, 0, 10, 10, 0]], np.float64)}
    r = gt_recall(gt, dets, ["car", "truck", "bus"])
    assert r["recall"] == pytest.approx(expected)
    assert r["gt_boxes"] == 1 and r["matched"] == int(expected)


def test_gt_boxes_map_to_rectified_pixels(seq):
    cam = CameraModel.from_camera_info(seq.camera_info)
    box = np.array([[1073, 560, 1215, 692, 0]], np.float64)
    out = map_boxes_raw_to_rect(cam, box)
    # every corner of the raw box lies inside the mapped box once undistorted
    corners = cam.undistort_points([[1073, 560], [1215, 560], [1073, 692], [1215, 692]])
    assert np.all(corners[:, 0] >= out[0, 0] - 1e-6) and np.all(corners[:, 0] <= out[0, 2] + 1e-6)
    assert out[0, 4] == 0
    ident = CameraModel(100, 100, [50, 0, 50, 0, 50, 50, 0, 0, 1])
    np.testing.assert_allclose(map_boxes_raw_to_rect(ident, np.array([[1, 2, 30, 40]])),
                               [[1, 2, 30, 40]])


def test_plan_params_lists_stages_without_weights_once(tmp_path):
    from perception2d_ros.demo.inputs import plan_params

    params = {"stages": ["rectify", "detect", "sam", "clip"], "models_dir": str(tmp_path),
              "extrinsics.enabled": True}
    p, missing, _ = plan_params(params)
    assert set(missing) == {"sam", "clip"}
    assert "perception2d models fetch" in missing["sam"]
    assert "sam" not in p["stages"] and "clip" not in p["stages"]
    # not asked for -> not listed
    _, missing, _ = plan_params({"stages": ["rectify", "detect"]})
    assert missing == {}


def _demo(args: list[str], tmp_path: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(151 + int(env.get("ROS_DOMAIN_ID", "0")) % 80)
    return subprocess.run([sys.executable, "-m", "perception2d_ros.demo.run", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_bag_it_cannot_use_is_one_line(tmp_path):
    (tmp_path / "junk.mcap").write_bytes(b"not a bag")
    for bag in ("missing.mcap", "junk.mcap"):
        res = _demo(["--bag", bag, "--out", "o"], tmp_path, 60)
        assert res.returncode in (1, 2), res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and bag in lines[0], res.stderr
        assert "Traceback" not in res.stderr


@pytest.mark.ros
def test_bag_without_camera_info_is_one_line(tmp_path):
    from perception2d_ros.io.bag_messages import image_msg
    from perception2d_ros.io.bag_writer import BagWriter

    bag = tmp_path / "noinfo.mcap"
    with BagWriter(bag) as w:
        w.add_topic("/cam/image_raw", "sensor_msgs/msg/Image")
        w.write("/cam/image_raw", 1, image_msg(w.typestore, np.zeros((4, 4, 3), np.uint8), 1,
                                                "cam"))
    res = _demo(["--bag", str(bag), "--out", "o"], tmp_path, 60)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().count("\n") == 0 and "/cam/camera_info" in res.stderr


@pytest.mark.ros
def test_make_demo_on_the_real_sequence(tmp_path):
    """The demo as `make demo` runs it (lockstep play by default: a loaded 2-core CI machine
    must not make the nodes' newest-frame-wins queue skip a frame): frames in = frames out,
    the GT minivan found and tracked, ground positions from TF on every frame at a plausible
    distance, and the report files."""
    res = _demo(["--out", str(tmp_path / "out")], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "out"
    s = json.loads((out / "summary.json").read_text())
    assert s["frames_in"] == s["frames_out"] == s["image_rect"] == 21
    assert s["ground_frames"] == 21
    # detections on the GT vehicles: the minivan ahead (GT row 0) in nearly every frame
    minivan = s["gt_recall"]["per_object"][0]
    assert minivan["frames"] == 21 and minivan["recall"] >= 0.7, s["gt_recall"]
    assert "rectified pixels" in s["gt_recall"]["compared_in"]
    # its ground distance: matched detections about 30 m ahead, near the lane centre
    dists = []
    for f in s["frames"]:
        for gi, di, _ in s["gt_recall"]["matches"][str(f["stamp_ns"])]:
            if gi == 0:
                dists.append(f["detections"][di]["distance_m"])
    # (YOLOX-nano sometimes adds a second, cut box on the van: a few outliers are allowed)
    assert len(dists) >= 17 and all(d is not None for d in dists), dists
    assert 24.0 < np.median(dists) < 34.0, dists
    assert np.mean([20.0 < d < 40.0 for d in dists]) >= 0.9, dists
    assert np.median(np.abs(np.diff(dists))) < 1.5, dists  # smooth frame to frame
    # the minivan keeps one track id through the clip
    assert s["stages_run"] == ["rectify", "detect", "track"]
    ids = [f["detections"][di]["id"] for f in s["frames"]
           for gi, di, _ in s["gt_recall"]["matches"][str(f["stamp_ns"])] if gi == 0]
    assert max(ids.count(i) for i in set(ids)) >= 0.9 * len(ids), ids
    assert s["tracks"] and s["tracks"][0]["distance_m"] is not None
    assert s["latency_ms"]["rectify"]["p50"] > 0 and s["latency_ms"]["detect"]["p95"] > 0
    assert s["calibration"]["D"][0] == pytest.approx(-0.564641)
    assert s["extrinsics"]["camera_height_m"] == pytest.approx(1.5, abs=1e-3)
    assert s["extrinsics"]["source"].startswith("tf")  # looked up by the nodes on /tf_static
    assert s["objects_frames"] == 21  # detections/objects (Detection3DArray) for every frame
    pngs = sorted((out / "annotated").glob("*.png"))
    assert len(pngs) == 21
    import cv2

    first = cv2.imread(str(pngs[0]))
    assert first.shape[0] == 1080 and first.shape[1] > 2 * 1920  # raw | rectified, native
    for name in ("contact_sheet.png", "plot.png", "output.mcap", "summary.txt", "report.html"):
        assert (out / name).stat().st_size > 0, name
    page = (out / "report.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 2 + 21  # self-contained
    assert "frames in / out        : 21 / 21" in res.stdout


@pytest.mark.ros
def test_report_renders_in_a_browser(tmp_path):
    """report.html opened by headless Chromium: the page draws (not a blank screenshot)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium here (Debian: apt-get install chromium)")
    from perception2d_ros.demo.report import html_report, plot_summary

    img = np.zeros((1080, 3848, 3), np.uint8)
    img[:, :1920] = (40, 160, 40)
    plot = plot_summary({"rectify": (5.0, 9.0), "detect": (15.0, 25.0)}, [{"car": 1}] * 3,
                        {"7": [(0, 30.0), (1, 29.5), (2, 29.0)]})
    summary = {"detections_per_class": {"car": 3},
               "latency_ms": {"rectify": {"p50": 5.0, "p95": 9.0}}}
    page = tmp_path / "report.html"
    page.write_text(html_report(summary, plot, img, [("frame_000.png", img)], "summary text"))
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                    "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    import cv2

    pic = cv2.imread(str(shot))
    assert pic is not None and pic.shape[:2] == (1600, 1200)
    # the plot's blue latency bars and the frame's green are on the page
    assert np.any(np.all(np.abs(pic.astype(int) - (200, 140, 60)) < 12, axis=2))
    assert np.any(np.all(np.abs(pic.astype(int) - (40, 160, 40)) < 12, axis=2))


def test_install_carries_the_demo_sequence(monkeypatch):
    """setup.py's data_files put config/demo.yaml and every file of data/demo into the
    package share, where the demo finds them from an install (colcon or pip)."""
    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.chdir(REPO)
    exec(compile((REPO / "setup.py").read_text(), "setup.py", "exec"), {"__name__": "setup"})
    installed = {f"{dest}/{Path(f).name}" for dest, files in captured["data_files"]
                 for f in files}
    wanted = {f"share/perception2d/{p.relative_to(REPO)}"
              for p in (REPO / "data" / "demo").rglob("*") if p.is_file()}
    wanted.add("share/perception2d/config/demo.yaml")
    assert wanted <= installed, sorted(wanted - installed)
