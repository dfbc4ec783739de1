"""The message types of bags, ROS-free: the ``rosbags`` ROS2_KILTED typestore, extended with
project message types parsed from ``.msg`` files (:func:`register_msg_dir`) or with installed
interface packages found through the ament index; the offered-QoS presets bags record.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rosbags.interfaces import (
    Qos,
    QosDurability,
    QosHistory,
    QosLiveliness,
    QosReliability,
    QosTime,
)
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

__all__ = [
    "CAMERA_INFO_TYPE",
    "COMPRESSED_IMAGE_TYPE",
    "IMAGE_TYPE",
    "default_qos_name",
    "find_installed_interface_dir",
    "find_interface_dirs",
    "make_typestore",
    "qos_preset",
    "register_msg_dir",
]

_REPO_DIR = Path(__file__).resolve().parents[2]
IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE_TYPE = "sensor_msgs/msg/CompressedImage"
CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"


# --------------------------------------------------------------------------------------------
# typestore
# --------------------------------------------------------------------------------------------
def _package_name(package_dir: Path) -> str:
    """Package name from ``package.xml`` (``<name>``) or, failing that, the directory name."""
    manifest = package_dir / "package.xml"
    if manifest.is_file():
        import xml.etree.ElementTree as ET

        try:
            name = ET.parse(manifest).getroot().findtext("name")
        except ET.ParseError as exc:
            raise ValueError(f"cannot parse {manifest}: {exc}") from exc
        if name and name.strip():
            return name.strip()
    return package_dir.name


def register_msg_dir(typestore: Any, package_dir: str | os.PathLike[str]) -> list[str]:
    """Register every ``msg/*.msg`` of one interface package with a rosbags typestore.

    Args:
        typestore: a ``rosbags`` typestore (e.g. from :func:`make_typestore`).
        package_dir: the package directory (holding ``msg/`` and ideally ``package.xml``;
            the package name is taken from ``package.xml`` or else the directory name).

    Returns:
        The registered type names (``pkg/msg/Name``), sorted.

    Raises:
        FileNotFoundError: ``package_dir`` or its ``msg/`` directory does not exist.
        ValueError: a ``.msg`` file does not parse or conflicts with a registered type.
    """
    pkg_dir = Path(package_dir)
    msg_dir = pkg_dir / "msg"
    if not msg_dir.is_dir():
        raise FileNotFoundError(f"no msg/ directory in interface package {pkg_dir}")
    package = _package_name(pkg_dir)
    types: dict[str, Any] = {}
    for msg_file in sorted(msg_dir.glob("*.msg")):
        name = f"{package}/msg/{msg_file.stem}"
        try:
            types.update(get_types_from_msg(msg_file.read_text(encoding="utf-8"), name))
        except Exception as exc:  # rosbags raises its own parser errors
            raise ValueError(f"cannot parse {msg_file} as {name}: {exc}") from exc
    known = set(typestore.fielddefs) | set(types)
    for name, (_consts, fields) in types.items():
        missing = sorted(ref for ref in _referenced_types(fields) if ref not in known)
        if missing:
            raise ValueError(f"{name} ({msg_dir}) uses unknown types {missing}")
    try:
        typestore.register(types)
    except Exception as exc:
        raise ValueError(f"cannot register the messages of {pkg_dir}: {exc}") from exc
    return sorted(types)


def _referenced_types(fields: Iterable[Any]) -> set[str]:
    """Message type names a rosbags field list refers to (directly or as array elements)."""
    from rosbags.interfaces import Nodetype

    refs: set[str] = set()
    for _name, (nodetype, spec) in fields:
        if nodetype in (Nodetype.ARRAY, Nodetype.SEQUENCE):
            nodetype, spec = spec[0]
        if nodetype == Nodetype.NAME:
            refs.add(spec)
    return refs


def find_interface_dirs(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Interface packages (directories with a ``msg/`` folder) under ``root/interfaces``.

    ``root`` defaults to the source checkout this module lives in; returns ``[]`` when the
    directory does not exist (e.g. an installed package).
    """
    base = (Path(root) if root is not None else _REPO_DIR) / "interfaces"
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if (p / "msg").is_dir())


def make_typestore(msg_dirs: Iterable[str | os.PathLike[str]] = ()) -> Any:
    """A fresh ROS2_KILTED rosbags typestore, extended with the packages in ``msg_dirs``.

    Packages are registered in an order that lets later ones depend on earlier ones; a
    package whose dependencies are still missing is retried after the others.
    """
    typestore = get_typestore(Stores.ROS2_KILTED)
    pending = [Path(d) for d in msg_dirs]
    while pending:
        failed: list[tuple[Path, Exception]] = []
        for pkg in pending:
            try:
                register_msg_dir(typestore, pkg)
            except ValueError as exc:
                failed.append((pkg, exc))
        if len(failed) == len(pending):
            raise failed[0][1]
        pending = [pkg for pkg, _ in failed]
    return typestore


def find_installed_interface_dir(package: str,
                                 prefixes: str | None = None) -> Path | None:
    """The installed interface package ``package`` (``<prefix>/share/<package>`` with a
    ``msg/`` folder) from the ament index: the first prefix of ``prefixes`` (default: the
    ``AMENT_PREFIX_PATH`` environment variable) that registers the package. ``None`` if no
    prefix has it. Plain file lookups: no ROS import."""
    search = os.environ.get("AMENT_PREFIX_PATH", "") if prefixes is None else prefixes
    for prefix in filter(None, search.split(os.pathsep)):
        marker = Path(prefix) / "share" / "ament_index" / "resource_index" / "packages" / package
        share = Path(prefix) / "share" / package
        if marker.is_file() and (share / "msg").is_dir():
            return share
    return None


def _register_installed(typestore: Any, package: str, seen: set[str]) -> bool:
    """Register an installed interface package with ``typestore``, after the installed
    packages its messages use; False when it is not installed or does not parse."""
    if package in seen:
        return False
    seen.add(package)
    share = find_installed_interface_dir(package)
    if share is None:
        return False
    refs: set[str] = set()
    try:
        for msg_file in sorted((share / "msg").glob("*.msg")):
            types = get_types_from_msg(msg_file.read_text(encoding="utf-8"),
                                       f"{package}/msg/{msg_file.stem}")
            refs |= {ref for _consts, fields in types.values()
                     for ref in _referenced_types(fields)}
    except Exception:  # rosbags raises its own parser errors
        return False
    for dep in sorted({ref.split("/")[0] for ref in refs
                       if ref not in typestore.fielddefs} - {package}):
        _register_installed(typestore, dep, seen)
    try:
        register_msg_dir(typestore, share)
    except ValueError:
        return False
    return True


def _ensure_msgtype(typestore: Any, msgtype: str) -> None:
    """Make sure ``msgtype`` is known: the project's interfaces of the source checkout,
    else the installed package's definitions found through the ament index
    (``AMENT_PREFIX_PATH``: a colcon or apt install)."""
    if msgtype in typestore.fielddefs:
        return
    if find_interface_dirs():
        try:
            project = make_typestore(find_interface_dirs())
        except ValueError:
            project = None  # a broken project package must not break unrelated topics
        if project is not None and msgtype in project.fielddefs:
            typestore.register({name: project.fielddefs[name] for name in project.fielddefs
                                if name not in typestore.fielddefs})
            return
    installed = get_typestore(Stores.ROS2_KILTED)
    if (_register_installed(installed, msgtype.split("/")[0], set())
            and msgtype in installed.fielddefs):
        typestore.register({name: installed.fielddefs[name] for name in installed.fielddefs
                            if name not in typestore.fielddefs})
        return
    raise KeyError(
        f"message type {msgtype!r} is unknown to the ROS2_KILTED typestore and not installed "
        "in AMENT_PREFIX_PATH; source the workspace that provides it (source "
        "install/setup.bash) or pass its interface package directory in msg_dirs"
    )


# --------------------------------------------------------------------------------------------
# QoS
# --------------------------------------------------------------------------------------------
_ZERO = QosTime(0, 0)
_INFINITE = QosTime(0x7FFFFFFF, 0xFFFFFFFF)  # rosbag2's "infinite" duration


def qos_preset(name: str, depth: int | None = None) -> list[Qos]:
    """Offered-QoS record for the bag metadata.

    Args:
        name: ``"sensor_data"`` (best effort, volatile, depth 5), ``"reliable"`` (reliable,
            volatile, depth 10) or ``"latched"`` (reliable, transient local, depth 1).
        depth: override of the history depth.
    """
    presets = {
        "sensor_data": (QosReliability.BEST_EFFORT, QosDurability.VOLATILE, 5),
        "reliable": (QosReliability.RELIABLE, QosDurability.VOLATILE, 10),
        "latched": (QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL, 1),
    }
    if name not in presets:
        raise ValueError(f"unknown QoS preset {name!r}; expected one of {sorted(presets)}")
    reliability, durability, default_depth = presets[name]
    return [
        Qos(
            history=QosHistory.KEEP_LAST,
            depth=default_depth if depth is None else int(depth),
            reliability=reliability,
            durability=durability,
            deadline=_INFINITE,
            lifespan=_INFINITE,
            liveliness=QosLiveliness.AUTOMATIC,
            liveliness_lease_duration=_INFINITE,
            avoid_ros_namespace_conventions=False,
        )
    ]


def default_qos_name(topic: str) -> str:
    """Project QoS convention: ``*label_info`` and ``/tf_static`` topics are latched (as
    their publishers offer them), everything else sensor data."""
    t = topic.rstrip("/")
    return "latched" if t.endswith("label_info") or t.endswith("/tf_static") else "sensor_data"

