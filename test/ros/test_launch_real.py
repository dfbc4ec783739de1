"""The real ROS 2 path, run the way a user with a full ROS 2 install runs it.

colcon-build the package and its interfaces into a temporary workspace, ``source
install/setup.bash``, ``ros2 launch perception2d bringup.launch.py`` (both modes), wait until
``ros2 lifecycle get`` says every node is active, ``ros2 param describe``, play a bag and record
the outputs with ``ros2 run perception2d perception2d bag play/record`` (the installed package:
message definitions come from the ament index, not from this checkout), then Ctrl-C (SIGINT to
the process group) and expect a clean exit. Bad launch arguments end launch with one line.

Needs the real launch stack (launch_ros, ros2cli): ``make test`` installs it into .venv from
``../shared/ros2-launch`` when that folder exists; a ROS 2 install from apt has it. colcon comes
from ``colcon-common-extensions`` (requirements/test.txt).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEFAULT_YAML = REPO / "config" / "perception2d.yaml"
NS = "/front"  # not the default namespace: namespace:= must take effect
FRAMES = 6
FRAME_ID = "camera_optical"
#: every node executable the launch file can start, plus the CLI
EXECUTABLES = ["perception2d", "rectify_node", "detector_node", "pipeline_node", "track_node",
               "sam_node", "clip_node", "lseg_node"]

_VENV_BIN = str(Path(sys.executable).parent)
_PATH = os.pathsep.join([_VENV_BIN, os.environ.get("PATH", "")])


def _missing_tools() -> str | None:
    """Why the real-launch tests cannot run here, or None."""
    if importlib.util.find_spec("launch_ros") is None or shutil.which("ros2", path=_PATH) is None:
        return ("the ROS 2 launch stack (launch_ros, ros2cli) is not installed: `make test` "
                "installs it into .venv from ../shared/ros2-launch when that folder exists; "
                "elsewhere source a ROS 2 install that has launch_ros")
    if shutil.which("colcon", path=_PATH) is None:
        return ("colcon is not installed (pip install colcon-common-extensions, see "
                "requirements/test.txt)")
    return None


pytestmark = [pytest.mark.slow, pytest.mark.ros,
              pytest.mark.skipif(_missing_tools() is not None, reason=str(_missing_tools()))]


def _base_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = _PATH
    # the checkout must not shadow the installed package under test
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in env.get("PYTHONPATH", "").split(os.pathsep)
        if p and Path(p).resolve() != REPO)
    # a domain of its own (other tests of the run use theirs); logs into the workspace
    env["ROS_DOMAIN_ID"] = str(1 + (int(env.get("ROS_DOMAIN_ID", "0")) + 57) % 101)
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    env.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    env.setdefault("FASTDDS_DEFAULT_PROFILES_FILE",
                   str(REPO / "config" / "fastdds_localhost_shm.xml"))
    env["ROS_LOG_DIR"] = str(tmp / "ros_log")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A colcon workspace with the package built and installed; returns the sourced env."""
    root = tmp_path_factory.mktemp("colcon_ws")
    (root / "src").mkdir()
    (root / "src" / "perception2d").symlink_to(REPO)  # like `git clone … src/perception2d`
    env = _base_env(root)
    if str(Path(sys.prefix)) not in env.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        env["AMENT_PREFIX_PATH"] = os.pathsep.join(
            p for p in [sys.prefix, env.get("AMENT_PREFIX_PATH", "")] if p)
    res = subprocess.run(
        ["colcon", "build", "--paths", "src/perception2d",
         "src/perception2d/interfaces/perception2d_interfaces"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    dump = subprocess.run(
        ["bash", "-c", 'source install/setup.bash && "$0" -c '
                       '"import json, os; print(json.dumps(dict(os.environ)))"', sys.executable],
        cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    sourced = json.loads(dump.stdout)
    where = subprocess.run(
        [sys.executable, "-c", "import perception2d_ros; print(perception2d_ros.__file__)"],
        cwd=root, env=sourced, capture_output=True, text=True, timeout=60)
    assert str(root / "install") in where.stdout, "the installed package is not the one imported"
    return {"root": root, "env": sourced}


def _run(ws: dict, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=ws["root"], env=ws["env"], capture_output=True,
                          text=True, timeout=timeout)


class Launch:
    """``ros2 launch perception2d bringup.launch.py ARGS`` in its own process group (a
    terminal's Ctrl-C reaches the whole foreground group)."""

    def __init__(self, ws: dict, args: list[str], log: Path) -> None:
        self.log = log
        self._out = open(log, "w")
        self.proc = subprocess.Popen(
            ["ros2", "launch", "perception2d", "bringup.launch.py", *args], cwd=ws["root"],
            env=ws["env"], stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text()

    def ctrl_c(self, timeout: float = 60) -> int:
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._out.close()


def _wait_active(ws: dict, launch: Launch, nodes: list[str], timeout: float = 180,
                 ns: str = NS) -> None:
    """Poll ``ros2 lifecycle get`` until every node says active."""
    deadline = time.monotonic() + timeout
    pending = list(nodes)
    last = ""
    while pending:
        assert launch.proc.poll() is None, f"launch ended early:\n{launch.output()[-4000:]}"
        assert time.monotonic() < deadline, (
            f"not active within {timeout:g} s: {pending} (last: {last})\n{launch.output()[-4000:]}")
        res = _run(ws, "ros2", "lifecycle", "get", f"{ns}/{pending[0]}", "--no-daemon")
        last = (res.stdout + res.stderr).strip()
        if res.returncode == 0 and res.stdout.startswith("active"):
            pending.pop(0)
        else:
            time.sleep(1.0)


def _wait_listed(ws: dict, nodes: list[str], timeout: float = 60) -> None:
    """Until ``ros2 node list`` shows every node (a fresh process needs a moment of
    discovery: --spin-time)."""
    deadline = time.monotonic() + timeout
    while True:
        res = _run(ws, "ros2", "node", "list", "--no-daemon", "--spin-time", "2")
        if set(nodes) <= set(res.stdout.split()):
            return
        assert time.monotonic() < deadline, f"ros2 node list: {res.stdout!r}, expected {nodes}"


def _wait_subscribed(ws: dict, topics: list[str], node: str, proc: subprocess.Popen,
                     timeout: float = 60) -> None:
    """Until ``node`` (run by ``proc``) shows up as a subscriber of every topic (``ros2 topic
    info -v``)."""
    deadline = time.monotonic() + timeout
    for topic in topics:
        while True:
            if proc.poll() is not None:
                out, _ = proc.communicate()
                pytest.fail(f"{node} exited with {proc.returncode}: {out}")
            res = _run(ws, "ros2", "topic", "info", "-v", topic, "--no-daemon",
                       "--spin-time", "2")
            if f"Node name: {node}" in res.stdout:
                break
            assert time.monotonic() < deadline, f"{node} never subscribed to {topic}: {res.stdout}"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def input_bag(ws: dict) -> Path:
    """A camera bag of real images, made with the installed CLI (``bag make``)."""
    images = ws["root"] / "images"
    images.mkdir()
    for f in sorted((REPO / "test" / "data" / "coco" / "images").glob("*.jpg"))[:FRAMES]:
        (images / f.name).symlink_to(f)
    out = ws["root"] / "input.mcap"
    res = _run(ws, "ros2", "run", "perception2d", "perception2d", "bag", "make",
               "--images", str(images), "--camera-info",
               str(REPO / "test" / "data" / "camera_info" / "left_plumb_bob.yaml"),
               "--rate", "4", "--resize", "640x480", "--frame-id", FRAME_ID,
               "--namespace", NS, str(out), timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def _stamps_and_frames(bag: Path) -> dict[str, list[tuple[int, str]]]:
    from perception2d_ros.io.bag_reader import BagReader
    from perception2d_ros.io.bag_types import find_interface_dirs

    out: dict[str, list[tuple[int, str]]] = {}
    with BagReader(bag, msg_dirs=find_interface_dirs()) as reader:
        for m in reader.messages():
            msg = reader.deserialize(m.rawdata, m.msgtype)
            stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
            out.setdefault(m.topic, []).append((stamp, msg.header.frame_id))
    return {t: sorted(v) for t, v in out.items()}


def test_installed_layout_has_every_executable_where_ros2_looks(ws):
    """ament_python puts console scripts in lib/<package> only with setup.cfg; launch_ros
    and `ros2 run` look nowhere else."""
    lib = ws["root"] / "install" / "perception2d" / "lib" / "perception2d"
    missing = [e for e in EXECUTABLES if not os.access(lib / e, os.X_OK)]
    assert not missing, f"not installed in {lib}: {missing}"
    res = _run(ws, "ros2", "pkg", "executables", "perception2d")
    assert res.returncode == 0, res.stderr
    listed = sorted(line.split()[1] for line in res.stdout.splitlines() if line.strip())
    assert listed == sorted(EXECUTABLES)


@pytest.mark.parametrize("pipeline", ["true", "false"])
def test_ros2_launch_runs_every_frame_and_stops_on_ctrl_c(ws, input_bag, tmp_path, pipeline):
    """ros2 launch → every lifecycle node active → param describe → bag play → one
    Detection2DArray and one image_rect per played frame, with the input stamps and
    frame_id → Ctrl-C → exit 0."""
    _launch_play_and_check(ws, tmp_path, pipeline, input_bag, [f"{NS}/image_raw"],
                           FRAMES, FRAME_ID)


def test_ros2_launch_with_compressed_images_from_a_ros1_bag(ws, tmp_path):
    """What a robot records: a ROS 1 bag of the real Apollo front camera's JPEG
    CompressedImage + CameraInfo, played by the installed CLI into `ros2 launch` with
    `image_transport: compressed` in the params file (separate nodes: rectify_node decodes):
    one Detection2DArray and one image_rect per frame, with the input stamps and frame_id."""
    from test_robot_inputs import FRAME_ID as APOLLO_FRAME_ID
    from test_robot_inputs import FRAMES as APOLLO_FRAMES
    from test_robot_inputs import write_ros1_bag

    bag = tmp_path / "apollo_front.bag"
    write_ros1_bag(bag, APOLLO_FRAMES, ns=NS)
    _launch_play_and_check(ws, tmp_path, "false", bag, [f"{NS}/image_raw/compressed"],
                           len(APOLLO_FRAMES), APOLLO_FRAME_ID, transport="compressed")


def _launch_play_and_check(ws: dict, tmp_path: Path, pipeline: str, input_bag: Path,
                           image_topics: list[str], frames: int, frame_id: str,
                           transport: str = "raw") -> None:
    from perception2d_ros.ros.bringup import node_list

    # reliable images end to end, so that every frame must come out also on a loaded machine
    params = yaml.safe_load(DEFAULT_YAML.read_text())
    params["/**"]["ros__parameters"]["image_reliability"] = "reliable"
    params["/**"]["ros__parameters"]["image_transport"] = transport
    pfile = tmp_path / "params_reliable.yaml"
    pfile.write_text(yaml.safe_dump(params))
    nodes = [s.name for s in node_list(pipeline=pipeline == "true", params_file=pfile)]
    assert nodes == (["pipeline_node"] if pipeline == "true" else ["rectify_node", "detector_node"])

    launch = Launch(ws, [f"namespace:={NS}", f"pipeline:={pipeline}", f"params_file:={pfile}"],
                    tmp_path / "launch.log")
    recorder = None
    try:
        _wait_active(ws, launch, nodes)
        _wait_listed(ws, [f"{NS}/{n}" for n in nodes])
        res = _run(ws, "ros2", "param", "describe", f"{NS}/{nodes[-1]}", "stages",
                   "image_reliability", "--timeout", "20", "--no-daemon")
        assert res.returncode == 0, res.stdout + res.stderr
        assert "Parameter name: stages\n  Type: string array" in res.stdout, res.stdout
        assert "Parameter name: image_reliability\n  Type: string" in res.stdout, res.stdout

        out_bag = tmp_path / "output.mcap"
        outputs = [f"{NS}/detections", f"{NS}/image_rect"]
        recorder = subprocess.Popen(
            ["ros2", "run", "perception2d", "perception2d", "bag", "record", "-o", str(out_bag),
             *outputs, "--messages", str(2 * frames), "--topic-timeout", "60"],
            cwd=ws["root"], env=ws["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True)
        _wait_subscribed(ws, outputs, "perception2d_bag_record", recorder)
        res = _run(ws, "ros2", "run", "perception2d", "perception2d", "bag", "play",
                   str(input_bag), "--reliable", "--rate", "0.5", "--wait-subscribers", "1",
                   "--wait-timeout", "30", "--topics", *image_topics, f"{NS}/camera_info",
                   timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        try:
            rec_out, _ = recorder.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # a frame is missing: stop it, the bag tells which
            os.killpg(recorder.pid, signal.SIGINT)
            rec_out, _ = recorder.communicate(timeout=30)
        assert recorder.returncode == 0, rec_out

        played = _stamps_and_frames(input_bag)[image_topics[0]]
        assert len(played) == frames and {f for _, f in played} == {frame_id}
        got = _stamps_and_frames(out_bag)
        for topic in outputs:
            assert got.get(topic) == played, (topic, got.get(topic), played, rec_out)

        rc = launch.ctrl_c()
        log = launch.output()
        assert rc == 0, log[-4000:]
        assert "Traceback" not in log, log[-4000:]
        assert len(re.findall(r"process has finished cleanly", log)) == len(nodes), log[-4000:]
    finally:
        if recorder is not None and recorder.poll() is None:
            os.killpg(recorder.pid, signal.SIGKILL)
            recorder.wait(timeout=30)
        launch.close()


def test_ros2_launch_with_defaults_uses_the_installed_params_file(ws, tmp_path):
    """No arguments at all: /camera, pipeline mode, the params file installed in
    share/perception2d/config (not this checkout's)."""
    launch = Launch(ws, [], tmp_path / "launch.log")
    try:
        _wait_active(ws, launch, ["pipeline_node"], ns="/camera")
        installed = ws["root"] / "install" / "perception2d" / "share" / "perception2d" / "config"
        import psutil

        cmdlines = [" ".join(c.cmdline()) for c in
                    psutil.Process(launch.proc.pid).children(recursive=True)]
        assert any(f"--params-file {installed / 'perception2d.yaml'}" in c for c in cmdlines), \
            cmdlines
        res = _run(ws, "ros2", "param", "get", "/camera/pipeline_node", "detect.model",
                   "--timeout", "20", "--no-daemon")
        assert res.stdout.strip() == "String value is: yolox_nano", res.stdout + res.stderr
        assert launch.ctrl_c() == 0, launch.output()[-4000:]
    finally:
        launch.close()


def _launch_error(ws: dict, *args: str) -> tuple[int, str]:
    res = _run(ws, "ros2", "launch", "perception2d", "bringup.launch.py", *args, timeout=120)
    return res.returncode, res.stdout + res.stderr


def test_ros2_launch_rejects_a_pipeline_value_that_is_not_true_or_false(ws):
    rc, out = _launch_error(ws, "pipeline:=maybe")
    assert rc != 0, out
    assert 'Argument "pipeline" provided value "maybe" is not valid' in out, out
    assert "Traceback" not in out and "process started" not in out, out


def test_ros2_launch_ends_with_one_line_on_a_missing_params_file(ws, tmp_path):
    missing = tmp_path / "nope.yaml"
    rc, out = _launch_error(ws, f"params_file:={missing}")
    assert rc != 0, out
    lines = [ln for ln in out.splitlines() if "params_file" in ln]
    assert len(lines) == 1 and f"params_file {missing}: no such file" in lines[0], out
    assert "Traceback" not in out and "process started" not in out, out


@pytest.mark.parametrize("content,problem", [
    ("/**:\n  ros__parameters: [unclosed\n", "not valid YAML"),
    ("just a string\n", "expected node names mapping to ros__parameters"),
    ("/**:\n  ros__parameters:\n    stages: [rectify, detekt]\n", "stages: unknown ['detekt']"),
])
def test_ros2_launch_ends_with_one_line_on_an_invalid_params_file(ws, tmp_path, content, problem):
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    rc, out = _launch_error(ws, f"params_file:={bad}")
    assert rc != 0, out
    lines = [ln for ln in out.splitlines() if str(bad) in ln]
    assert len(lines) == 1 and problem in lines[0], out
    assert "Traceback" not in out and "process started" not in out, out
