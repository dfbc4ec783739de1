"""Message definitions of installed interface packages, found through the ament index
(``AMENT_PREFIX_PATH``), the way a colcon or apt install lays them out: ``bag record`` of an
installed perception2d must not need the source checkout's ``interfaces/``."""
from __future__ import annotations

from pathlib import Path

import pytest

from perception2d_ros.io.bag_reader import BagReader
from perception2d_ros.io.bag_types import find_installed_interface_dir
from perception2d_ros.io.bag_writer import BagWriter


def _install(prefix: Path, package: str, msgs: dict[str, str]) -> Path:
    """An installed interface package: ament index marker + share/<pkg>/msg/*.msg."""
    index = prefix / "share" / "ament_index" / "resource_index" / "packages"
    index.mkdir(parents=True, exist_ok=True)
    (index / package).write_text("")
    msg_dir = prefix / "share" / package / "msg"
    msg_dir.mkdir(parents=True)
    for name, text in msgs.items():
        (msg_dir / f"{name}.msg").write_text(text)
    return prefix / "share" / package


@pytest.fixture
def two_prefixes(tmp_path, monkeypatch):
    """p2d_test_msgs/Thing (first prefix) uses p2d_dep_msgs/Part (second prefix): two
    workspaces chained like `source ws1 && source ws2`."""
    a, b = tmp_path / "ws_a" / "install", tmp_path / "ws_b" / "install"
    _install(a, "p2d_test_msgs", {"Thing": "std_msgs/Header header\np2d_dep_msgs/Part[] parts\n"})
    _install(b, "p2d_dep_msgs", {"Part": "string name\nfloat64 size\n"})
    # an unregistered share/ folder (no ament index marker) is not a package
    (b / "share" / "p2d_ghost_msgs" / "msg").mkdir(parents=True)
    (b / "share" / "p2d_ghost_msgs" / "msg" / "Ghost.msg").write_text("int32 x\n")
    monkeypatch.setenv("AMENT_PREFIX_PATH", f"{a}:{b}")
    return a, b


def test_find_installed_interface_dir_uses_the_ament_index(two_prefixes):
    a, b = two_prefixes
    assert find_installed_interface_dir("p2d_test_msgs") == a / "share" / "p2d_test_msgs"
    assert find_installed_interface_dir("p2d_dep_msgs") == b / "share" / "p2d_dep_msgs"
    assert find_installed_interface_dir("p2d_ghost_msgs") is None
    assert find_installed_interface_dir("p2d_test_msgs", prefixes=str(b)) is None


def test_writer_takes_an_installed_type_and_its_installed_dependencies(two_prefixes, tmp_path):
    out = tmp_path / "out.mcap"
    with BagWriter(out) as writer:
        writer.add_topic("/things", "p2d_test_msgs/msg/Thing")
        ts = writer.typestore
        part = ts.types["p2d_dep_msgs/msg/Part"](name="wheel", size=0.5)
        header = ts.types["std_msgs/msg/Header"](
            stamp=ts.types["builtin_interfaces/msg/Time"](sec=7, nanosec=9), frame_id="base")
        writer.write("/things", 1, ts.types["p2d_test_msgs/msg/Thing"](header=header,
                                                                       parts=[part]))
    with BagReader(out) as reader:  # definitions travel in the MCAP: no index needed to read
        (m,) = list(reader.messages())
        msg = reader.deserialize(m.rawdata, m.msgtype)
    assert m.msgtype == "p2d_test_msgs/msg/Thing"
    assert (msg.header.stamp.sec, msg.header.frame_id) == (7, "base")
    assert [(p.name, p.size) for p in msg.parts] == [("wheel", 0.5)]


def test_an_unknown_type_names_the_fix(two_prefixes, tmp_path):
    with BagWriter(tmp_path / "x.mcap") as writer:
        with pytest.raises(KeyError, match="not installed in AMENT_PREFIX_PATH; source the "
                                           "workspace"):
            writer.add_topic("/ghost", "p2d_ghost_msgs/msg/Ghost")
