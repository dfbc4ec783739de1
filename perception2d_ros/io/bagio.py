"""ROS-free rosbag2 reading and writing on top of ``rosbags`` (MCAP by default, sqlite3 optional);
reading ROS 1 ``.bag`` files too (their messages come out as ROS 2 CDR).

Everything here works without a ROS installation: messages are (de)serialised with the
``rosbags`` ROS2_KILTED typestore, optionally extended with project message types parsed from
``.msg`` files (:func:`register_msg_dir`).

Output layout (:class:`BagWriter`):

* ``OUT`` ending in ``.mcap`` / ``.db3`` -> one bare storage file (``ros2 bag play OUT.mcap``,
  Foxglove and ``mcap_ros2`` read it directly);
* any other ``OUT`` -> a rosbag2 directory ``OUT/`` with ``metadata.yaml`` and
  ``OUT/<name>.mcap`` (or ``.db3``), the layout ``ros2 bag record`` produces.

ROS 1 bags (:class:`BagReader` recognises them by their ``#ROSBAG V2.0`` header) are read with
``rosbags.rosbag1``; every message is converted to the ROS 2 type of the same name (ROS 1
``sensor_msgs/CompressedImage`` -> ``sensor_msgs/msg/CompressedImage``, ``CameraInfo``'s
``D, K, R, P`` -> ``d, k, r, p``, ``Header.seq`` dropped) with rosbags' own converter, the one
``rosbags-convert`` uses, so consumers see the same CDR bytes as from a ROS 2 bag.

Writing is atomic: data goes to a hidden sibling directory and is moved into place on a
successful :meth:`BagWriter.close`; an exception inside the ``with`` block discards it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.interfaces import (
    ConnectionExtRosbag2,
    MessageDefinitionFormat,
    Qos,
    QosDurability,
    QosHistory,
    QosLiveliness,
    QosReliability,
    QosTime,
)
from rosbags.rosbag1 import Reader as Ros1Reader
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

__all__ = [
    "STORAGES",
    "BagReader",
    "BagWriter",
    "BagMessage",
    "CameraTopics",
    "TopicMeta",
    "bag_info",
    "find_camera_topics",
    "image_streams",
    "is_ros1_bag",
    "camera_info_msg",
    "compressed_image_msg",
    "default_qos_name",
    "find_installed_interface_dir",
    "find_interface_dirs",
    "image_msg",
    "image_to_numpy",
    "make_typestore",
    "ns_to_stamp",
    "qos_preset",
    "register_msg_dir",
    "stamp_to_ns",
    "storage_for_path",
]

#: Storage identifiers accepted by :class:`BagWriter`.
STORAGES: tuple[str, ...] = ("mcap", "sqlite3")
_SUFFIX = {"mcap": ".mcap", "sqlite3": ".db3"}
_PLUGIN = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
_BAG_VERSION = 9  # rosbag2 metadata version written by Jazzy/Kilted

#: ``sensor_msgs/Image`` encodings understood by :func:`image_to_numpy` -> (dtype, channels).
_ENCODINGS: dict[str, tuple[str, int]] = {
    "bgr8": ("uint8", 3),
    "rgb8": ("uint8", 3),
    "bgra8": ("uint8", 4),
    "rgba8": ("uint8", 4),
    "mono8": ("uint8", 1),
    "8UC1": ("uint8", 1),
    "8UC3": ("uint8", 3),
    "mono16": ("uint16", 1),
    "16UC1": ("uint16", 1),
    "32FC1": ("float32", 1),
}

_REPO_DIR = Path(__file__).resolve().parents[2]
_ROS1_MAGIC = b"#ROSBAG V2.0"
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


# --------------------------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------------------------
def ns_to_stamp(typestore: Any, stamp_ns: int) -> Any:
    """``builtin_interfaces/msg/Time`` for an integer nanosecond timestamp (must be >= 0)."""
    stamp_ns = int(stamp_ns)
    if stamp_ns < 0:
        raise ValueError(f"timestamps must be >= 0 ns, got {stamp_ns}")
    time_cls = typestore.types["builtin_interfaces/msg/Time"]
    return time_cls(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000)


def stamp_to_ns(stamp: Any) -> int:
    """Integer nanoseconds of a ``builtin_interfaces/msg/Time`` (rosbags, rclpy or mcap_ros2)."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _header(typestore: Any, stamp_ns: int, frame_id: str) -> Any:
    header_cls = typestore.types["std_msgs/msg/Header"]
    return header_cls(stamp=ns_to_stamp(typestore, stamp_ns), frame_id=str(frame_id))


def image_msg(
    typestore: Any, image: np.ndarray, stamp_ns: int, frame_id: str, encoding: str = "bgr8"
) -> Any:
    """A rosbags ``sensor_msgs/msg/Image`` holding ``image`` (HxW or HxWxC, C-contiguous copy).

    Args:
        typestore: rosbags typestore.
        image: the pixels; for the default ``bgr8`` a ``uint8`` HxWx3 array (OpenCV order).
        stamp_ns: header stamp in nanoseconds.
        frame_id: header frame id.
        encoding: one of the encodings in ``_ENCODINGS`` (dtype and channels are checked).
    """
    if encoding not in _ENCODINGS:
        raise ValueError(f"unsupported encoding {encoding!r}; expected one of {sorted(_ENCODINGS)}")
    dtype, channels = _ENCODINGS[encoding]
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] != channels:
        raise ValueError(f"{encoding} needs an HxWx{channels} array, got shape {np.shape(image)}")
    if arr.dtype != np.dtype(dtype):
        raise ValueError(f"{encoding} needs dtype {dtype}, got {arr.dtype}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"empty image of shape {arr.shape}")
    arr = np.ascontiguousarray(arr)
    height, width = arr.shape[:2]
    image_cls = typestore.types["sensor_msgs/msg/Image"]
    return image_cls(
        header=_header(typestore, stamp_ns, frame_id),
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=0,
        step=width * channels * arr.dtype.itemsize,
        data=arr.reshape(-1).view(np.uint8),
    )


def compressed_image_msg(typestore: Any, fmt: str, data: bytes, stamp_ns: int,
                         frame_id: str) -> Any:
    """A rosbags ``sensor_msgs/msg/CompressedImage`` (``format`` as image_transport writes it,
    e.g. from :func:`perception2d_ros.io.image_codec.encode_compressed`)."""
    if not data:
        raise ValueError("compressed image data is empty")
    cls = typestore.types[COMPRESSED_IMAGE_TYPE]
    return cls(header=_header(typestore, stamp_ns, frame_id), format=str(fmt),
               data=np.frombuffer(bytes(data), dtype=np.uint8))


def image_to_numpy(msg: Any) -> np.ndarray:
    """Pixels of a ``sensor_msgs/Image`` (rosbags, rclpy or mcap_ros2 object) as an array.

    Returns HxW for one-channel encodings and HxWxC otherwise; honours ``step`` padding.
    """
    encoding = str(msg.encoding)
    if encoding not in _ENCODINGS:
        raise ValueError(f"unsupported encoding {encoding!r}; expected one of {sorted(_ENCODINGS)}")
    dtype, channels = _ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    raw = np.frombuffer(bytes(msg.data) if not isinstance(msg.data, np.ndarray) else msg.data,
                        dtype=np.uint8)
    row_bytes = width * channels * np.dtype(dtype).itemsize
    if step < row_bytes or raw.size < step * height:
        raise ValueError(
            f"image data too short: {raw.size} bytes for {height} rows of step {step} "
            f"({width}x{channels} {dtype})"
        )
    rows = raw[: step * height].reshape(height, step)[:, :row_bytes]
    big = bool(msg.is_bigendian)
    dt = np.dtype(dtype).newbyteorder(">" if big else "<")
    arr = np.ascontiguousarray(rows).view(dt).astype(dtype, copy=False)
    arr = arr.reshape(height, width, channels)
    return arr[:, :, 0] if channels == 1 else arr


def camera_info_msg(typestore: Any, info: Mapping[str, Any], stamp_ns: int, frame_id: str) -> Any:
    """A rosbags ``sensor_msgs/msg/CameraInfo`` from a ``CameraModel.to_camera_info_dict()`` dict.

    Required keys: ``width, height, distortion_model, d, k, r, p``; optional ``binning_x,
    binning_y`` (default 0) and ``roi`` (dict with ``x_offset, y_offset, height, width,
    do_rectify``; default all zero/False).
    """
    missing = [key for key in ("width", "height", "distortion_model", "d", "k", "r", "p")
               if key not in info]
    if missing:
        raise ValueError(f"camera info dict lacks {missing}")
    sizes = {"k": 9, "r": 9, "p": 12}
    arrays = {}
    for key, size in sizes.items():
        arr = np.asarray(info[key], dtype=np.float64).reshape(-1)
        if arr.size != size:
            raise ValueError(f"camera info {key!r} needs {size} values, got {arr.size}")
        arrays[key] = arr
    roi_in = dict(info.get("roi") or {})
    roi_cls = typestore.types["sensor_msgs/msg/RegionOfInterest"]
    roi = roi_cls(
        x_offset=int(roi_in.get("x_offset", 0)),
        y_offset=int(roi_in.get("y_offset", 0)),
        height=int(roi_in.get("height", 0)),
        width=int(roi_in.get("width", 0)),
        do_rectify=bool(roi_in.get("do_rectify", False)),
    )
    info_cls = typestore.types["sensor_msgs/msg/CameraInfo"]
    return info_cls(
        header=_header(typestore, stamp_ns, frame_id),
        height=int(info["height"]),
        width=int(info["width"]),
        distortion_model=str(info["distortion_model"]),
        d=np.asarray(info["d"], dtype=np.float64).reshape(-1),
        k=arrays["k"],
        r=arrays["r"],
        p=arrays["p"],
        binning_x=int(info.get("binning_x", 0) or 0),
        binning_y=int(info.get("binning_y", 0) or 0),
        roi=roi,
    )


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def storage_for_path(path: str | os.PathLike[str], storage: str | None = None) -> str:
    """Storage id for an output path: explicit ``storage`` or inferred (``.db3`` -> sqlite3).

    Raises:
        ValueError: unknown storage, or a ``.mcap``/``.db3`` suffix contradicting ``storage``.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".bag":
        raise ValueError(f"output {str(path)!r}: ROS 1 .bag output is not supported; write a "
                         "ROS 2 bag (OUT.mcap, OUT.db3 or a directory)")
    inferred = {".mcap": "mcap", ".db3": "sqlite3"}.get(suffix)
    if storage is None:
        return inferred or "mcap"
    if storage not in STORAGES:
        raise ValueError(f"unknown storage {storage!r}; expected one of {list(STORAGES)}")
    if inferred and inferred != storage:
        raise ValueError(f"output {str(path)!r} has suffix {suffix} but storage is {storage!r}")
    return storage


class BagWriter:
    """Write a rosbag2 bag (MCAP by default). Use as a context manager.

    Example::

        with BagWriter("out.mcap") as bag:
            bag.add_topic("/camera/image_raw", "sensor_msgs/msg/Image")
            bag.write("/camera/image_raw", stamp_ns, image_msg(bag.typestore, img, stamp_ns, "cam"))
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        storage: str | None = None,
        *,
        typestore: Any = None,
        msg_dirs: Iterable[str | os.PathLike[str]] = (),
        overwrite: bool = False,
    ) -> None:
        """Prepare a writer (nothing is created until :meth:`open` / ``__enter__``).

        Args:
            path: ``*.mcap`` / ``*.db3`` for a single storage file, anything else for a
                rosbag2 directory.
            storage: ``"mcap"`` or ``"sqlite3"``; default inferred from the suffix, else mcap.
            typestore: rosbags typestore; default :func:`make_typestore` (msg_dirs).
            msg_dirs: interface package dirs to register when ``typestore`` is not given.
            overwrite: replace an existing ``path`` instead of failing.
        """
        self.path = Path(path)
        self.storage = storage_for_path(self.path, storage)
        self.single_file = self.path.suffix.lower() in (".mcap", ".db3")
        self.typestore = typestore if typestore is not None else make_typestore(msg_dirs)
        self.overwrite = overwrite
        self._writer: Writer | None = None
        self._tmpdir: Path | None = None
        self._connections: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    # -- lifecycle ------------------------------------------------------------------------
    def open(self) -> BagWriter:
        """Create the (temporary) storage. Fails if ``path`` exists and not ``overwrite``."""
        if self._writer is not None:
            raise RuntimeError("BagWriter is already open")
        if self.path.exists() and not self.overwrite:
            raise FileExistsError(f"{self.path} exists already (use overwrite to replace it)")
        parent = self.path.parent
        if not parent.is_dir():
            raise FileNotFoundError(f"output directory {parent} does not exist")
        self._tmpdir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".partial",
                                             dir=parent))
        inner = self._tmpdir / (self.path.stem if self.single_file else self.path.name)
        self._writer = Writer(inner, version=_BAG_VERSION, storage_plugin=_PLUGIN[self.storage])
        try:
            self._writer.open()
        except BaseException:
            self._discard()
            raise
        return self

    def __enter__(self) -> BagWriter:
        return self.open()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def is_open(self) -> bool:
        """True between :meth:`open` and :meth:`close` / :meth:`abort`."""
        return self._writer is not None

    def close(self) -> Path:
        """Finish the bag and move it to ``path``. Returns ``path``."""
        writer = self._require_open()
        assert self._tmpdir is not None
        try:
            writer.close()
            inner = writer.path
            src = inner / f"{inner.name}{_SUFFIX[self.storage]}" if self.single_file else inner
            if not src.exists():
                raise RuntimeError(f"rosbags did not produce {src}")
            if self.path.exists():  # overwrite was checked in open()
                if self.path.is_dir() and not self.path.is_symlink():
                    shutil.rmtree(self.path)
                else:
                    self.path.unlink()
            os.replace(src, self.path)
        finally:
            self._writer = None
            self._discard()
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; ``path`` is left untouched."""
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.abort()
            except Exception:  # noqa: BLE001 - best effort cleanup
                pass
        self._discard()

    def _discard(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def _require_open(self) -> Writer:
        if self._writer is None:
            raise RuntimeError("BagWriter is not open (use it as a context manager or call open())")
        return self._writer

    # -- topics and messages ---------------------------------------------------------------
    def add_topic(
        self, name: str, msgtype: str, qos: str | Sequence[Qos] | None = None
    ) -> None:
        """Declare a topic.

        Args:
            name: absolute topic name (``/camera/image_raw``).
            msgtype: ``pkg/msg/Type``; must be known to the typestore.
            qos: offered QoS stored in the metadata: a :func:`qos_preset` name, a list of
                rosbags ``Qos``, or None for :func:`default_qos_name` of the topic.
        """
        writer = self._require_open()
        if not name.startswith("/") or "//" in name or name.endswith("/") and name != "/":
            raise ValueError(f"topic name must be absolute and well formed, got {name!r}")
        if name in self._connections:
            raise ValueError(f"topic {name} was already added")
        _ensure_msgtype(self.typestore, msgtype)
        if qos is None:
            qos = default_qos_name(name)
        profiles = qos_preset(qos) if isinstance(qos, str) else list(qos)
        self._connections[name] = writer.add_connection(
            name, msgtype, typestore=self.typestore, offered_qos_profiles=profiles
        )
        self.counts[name] = 0

    @property
    def topics(self) -> dict[str, str]:
        """Declared topics -> message type."""
        return {name: conn.msgtype for name, conn in self._connections.items()}

    def write(self, topic: str, timestamp_ns: int, msg: Any) -> None:
        """Write one message.

        Args:
            topic: a topic declared with :meth:`add_topic`.
            timestamp_ns: bag (receive/log) time in nanoseconds, >= 0.
            msg: CDR bytes (``bytes``/``bytearray``/``memoryview``) or a rosbags message
                object of the topic's type (serialised here).
        """
        writer = self._require_open()
        conn = self._connections.get(topic)
        if conn is None:
            raise KeyError(f"topic {topic} was not added (known: {sorted(self._connections)})")
        timestamp_ns = int(timestamp_ns)
        if timestamp_ns < 0:
            raise ValueError(f"timestamps must be >= 0 ns, got {timestamp_ns}")
        if isinstance(msg, (bytes, bytearray, memoryview)):
            data = bytes(msg)
        else:
            msg_name = getattr(msg, "__msgtype__", None)
            if msg_name != conn.msgtype:
                raise TypeError(f"{topic} carries {conn.msgtype}, got {msg_name or type(msg)}")
            data = bytes(self.typestore.serialize_cdr(msg, conn.msgtype))
        writer.write(conn, timestamp_ns, data)
        self.counts[topic] += 1

    @property
    def message_count(self) -> int:
        """Messages written so far."""
        return sum(self.counts.values())


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TopicMeta:
    """One topic of a bag."""

    name: str
    msgtype: str
    count: int
    qos: list[Qos] = field(default_factory=list)


@dataclass(frozen=True)
class BagMessage:
    """One stored message: topic, type, bag timestamp (ns) and CDR bytes."""

    topic: str
    msgtype: str
    timestamp_ns: int
    rawdata: bytes

    def __iter__(self) -> Iterator[Any]:  # allows ``topic, msgtype, ts, raw = message``
        return iter((self.topic, self.msgtype, self.timestamp_ns, self.rawdata))


def is_ros1_bag(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a ROS 1 bag file (starts with ``#ROSBAG V2.0``)."""
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as f:
        return f.read(len(_ROS1_MAGIC)) == _ROS1_MAGIC


class _Ros1ToCdr:
    """Converts the raw ROS 1 messages of a bag to ROS 2 CDR of the same-named ROS 2 type.

    The source types come from the message definitions stored in the bag (every ROS 1 bag
    carries them); the destination is the reader's ROS 2 typestore. Types with the same wire
    format (all of sensor_msgs, geometry_msgs, tf2_msgs, …: only ``Header.seq`` differs) are
    converted byte-level by ``Typestore.ros1_to_cdr``; others are migrated field by field;
    types with no ROS 2 counterpart keep their ROS 1 definition — as ``rosbags-convert``
    does, with its functions.
    """

    def __init__(self, connections: Sequence[Any], typestore: Any) -> None:
        from rosbags.convert.converter import is_same_wireformat, migrate_bytes

        self._same = is_same_wireformat
        self._migrate = migrate_bytes
        self.src = get_typestore(Stores.EMPTY)
        types: dict[str, Any] = {}
        for conn in connections:
            if conn.msgdef.format == MessageDefinitionFormat.MSG and conn.msgdef.data:
                types.update(get_types_from_msg(conn.msgdef.data, conn.msgtype))
        if not types:  # no definitions stored: assume the ROS 1 Noetic ones
            types = dict(get_typestore(Stores.ROS1_NOETIC).fielddefs)
        self.src.register(types)
        self.dst = typestore
        self._cache: dict[str, object] = {}
        self._funcs: dict[str, Any] = {}

    def _func(self, msgtype: str) -> Any:
        func = self._funcs.get(msgtype)
        if func is not None:
            return func
        if msgtype not in self.src.fielddefs:
            raise KeyError(f"the ROS 1 bag has no definition of {msgtype}")
        if msgtype not in self.dst.fielddefs:
            typs = get_types_from_msg(self.src.generate_msgdef(msgtype, ros_version=2)[0],
                                      msgtype)
            typs.pop("std_msgs/msg/Header", None)
            self.dst.register({k: v for k, v in typs.items() if k not in self.dst.fielddefs})
        if self._same(self.src, self.dst, msgtype, msgtype):
            def func(raw: bytes, _t: str = msgtype) -> Any:
                return self.dst.ros1_to_cdr(raw, _t)
        else:
            def func(raw: bytes, _t: str = msgtype) -> Any:
                return self._migrate(self.src, self.dst, _t, _t, self._cache, raw,
                                     src_is2=False, dst_is2=True)
        self._funcs[msgtype] = func
        return func

    def __call__(self, msgtype: str, raw: bytes | memoryview) -> bytes:
        """ROS 2 CDR of one raw ROS 1 message; ValueError naming the type if it is corrupt."""
        try:
            return bytes(self._func(msgtype)(raw))
        except (KeyError, ValueError):
            raise
        except Exception as exc:  # rosbags' SerdeError and struct errors
            raise ValueError(f"cannot convert a ROS 1 {msgtype} message: {exc}") from None


class BagReader:
    """Read a rosbag2 directory, a bare ``.mcap`` / ``.db3`` file or a ROS 1 ``.bag`` file
    (context manager).

    Iterating yields :class:`BagMessage` tuples ``(topic, msgtype, timestamp_ns, rawdata)``
    in timestamp order; ``rawdata`` is ROS 2 CDR for every kind of bag (ROS 1 messages are
    converted, see the module docstring), ``msgtype`` the ROS 2 name (``pkg/msg/Type``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        typestore: Any = None,
        msg_dirs: Iterable[str | os.PathLike[str]] = (),
    ) -> None:
        """Args: path of the bag; typestore / msg_dirs as for :class:`BagWriter`."""
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"bag {self.path} does not exist")
        self.typestore = typestore if typestore is not None else make_typestore(msg_dirs)
        self.is_ros1 = is_ros1_bag(self.path)
        self._reader: Any = None
        self._ros1: _Ros1ToCdr | None = None

    def open(self) -> BagReader:
        """Open the bag and register message types that are only defined inside it."""
        if self._reader is not None:
            raise RuntimeError("BagReader is already open")
        try:
            reader = Ros1Reader(self.path) if self.is_ros1 else Reader(self.path)
            reader.open()
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise ValueError(f"cannot open bag {self.path}: {exc}") from exc
        self._reader = reader
        if self.is_ros1:
            try:
                self._ros1 = _Ros1ToCdr(reader.connections, self.typestore)
            except Exception as exc:
                reader.close()
                self._reader = None
                raise ValueError(f"cannot read the message definitions of ROS 1 bag "
                                 f"{self.path}: {exc}") from exc
            return self
        for conn in reader.connections:
            if conn.msgtype in self.typestore.fielddefs:
                continue
            if conn.msgdef.format == MessageDefinitionFormat.MSG and conn.msgdef.data:
                try:
                    self.typestore.register(get_types_from_msg(conn.msgdef.data, conn.msgtype))
                except Exception:  # noqa: BLE001 - leave it; deserialize() reports clearly
                    pass
        return self

    def __enter__(self) -> BagReader:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the bag (idempotent)."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def _require_open(self) -> Any:
        if self._reader is None:
            raise RuntimeError("BagReader is not open (use it as a context manager or call open())")
        return self._reader

    # -- metadata ----------------------------------------------------------------------------
    @property
    def storage(self) -> str:
        """``"mcap"``, ``"sqlite3"`` or ``"rosbag1"``."""
        if self.is_ros1:
            return "rosbag1"
        if self.path.is_dir():
            if any(self.path.glob("*.db3")):
                return "sqlite3"
            return "mcap"
        return "sqlite3" if self.path.suffix.lower() == ".db3" else "mcap"

    @property
    def topics(self) -> dict[str, TopicMeta]:
        """Topics by name, sorted by name (ROS 1 latched topics get the latched QoS)."""
        reader = self._require_open()
        out: dict[str, TopicMeta] = {}
        for name, info in sorted(reader.topics.items()):
            qos: list[Qos] = []
            for conn in info.connections:
                if isinstance(conn.ext, ConnectionExtRosbag2):
                    qos.extend(conn.ext.offered_qos_profiles)
                elif getattr(conn.ext, "latching", 0):
                    qos.extend(qos_preset("latched"))
            msgtype = info.msgtype or ",".join(sorted({c.msgtype for c in info.connections}))
            out[name] = TopicMeta(name, msgtype, int(info.msgcount), qos)
        return out

    @property
    def message_count(self) -> int:
        """Total number of messages."""
        return int(self._require_open().message_count)

    def time_range(self) -> tuple[int, int] | None:
        """``(first, last)`` message timestamps in ns, or None for an empty bag."""
        reader = self._require_open()
        if not reader.message_count:
            return None
        start = int(reader.start_time)
        # rosbags reports the end as "last + 1" for most storages but not all (old sqlite3
        # files without metadata); look at the messages around it (an indexed, cheap read).
        end = int(reader.end_time)
        near = [int(ts) for _, ts, _ in reader.messages(start=max(start, end - 1), stop=end + 1)]
        return start, max(near) if near else max(start, end - 1)

    # -- messages ----------------------------------------------------------------------------
    def messages(
        self,
        topics: Iterable[str] | None = None,
        start_ns: int | None = None,
        stop_ns: int | None = None,
    ) -> Iterator[BagMessage]:
        """Messages in timestamp order, optionally only ``topics`` and ``[start_ns, stop_ns)``.

        Raises:
            KeyError: a requested topic is not in the bag.
        """
        reader = self._require_open()
        conns = reader.connections
        if topics is not None:
            wanted = set(topics)
            known = {c.topic for c in conns}
            if unknown := sorted(wanted - known):
                raise KeyError(f"topics {unknown} are not in {self.path} (has {sorted(known)})")
            conns = [c for c in conns if c.topic in wanted]
            if not conns:
                return
        convert = self._ros1
        for conn, timestamp, data in reader.messages(conns, start=start_ns, stop=stop_ns):
            raw = convert(conn.msgtype, data) if convert is not None else bytes(data)
            yield BagMessage(conn.topic, conn.msgtype, int(timestamp), raw)

    def __iter__(self) -> Iterator[BagMessage]:
        return self.messages()

    def deserialize(self, rawdata: bytes | memoryview, msgtype: str) -> Any:
        """Decode CDR bytes into a rosbags message object."""
        if msgtype not in self.typestore.fielddefs:
            raise KeyError(f"message type {msgtype!r} is unknown (no definition in the bag or "
                           "typestore; pass msg_dirs)")
        return self.typestore.deserialize_cdr(rawdata, msgtype)

    def decoded(self, topics: Iterable[str] | None = None) -> Iterator[tuple[str, int, Any]]:
        """``(topic, timestamp_ns, message)`` with messages decoded by :meth:`deserialize`."""
        for message in self.messages(topics):
            yield message.topic, message.timestamp_ns, self.deserialize(
                message.rawdata, message.msgtype
            )


# --------------------------------------------------------------------------------------------
# camera topics
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CameraTopics:
    """The camera streams of a bag: ``image`` (an Image or a CompressedImage topic),
    ``transport`` (``"raw"`` / ``"compressed"``, image_transport's names), the matching
    ``camera_info`` (None when absent) and ``namespace`` (where outputs go)."""

    image: str
    transport: str
    camera_info: str | None
    namespace: str

    @property
    def base(self) -> str:
        """The image_transport base topic (``…/image_raw`` for ``…/image_raw/compressed``)."""
        return self.image[: -len("/compressed")] if self.transport == "compressed" else self.image


def _msgtype_of(meta: Any) -> str:
    if isinstance(meta, str):
        return meta
    if isinstance(meta, Mapping):
        return str(meta.get("type", ""))
    return str(getattr(meta, "msgtype", ""))


def image_streams(topics: Mapping[str, Any]) -> list[CameraTopics]:
    """Every camera image topic of a bag (Image topics and ``…/compressed`` CompressedImage
    topics), each with the CameraInfo topic of its namespace (``camera_info``, or for
    ``image_rect`` ``camera_info_rect`` first), sorted by topic.

    ``topics`` maps topic names to a :class:`TopicMeta`, a :func:`bag_info` topic dict or a
    type name.
    """
    types = {name: _msgtype_of(meta) for name, meta in topics.items()}
    out = []
    for name, msgtype in sorted(types.items()):
        if msgtype == IMAGE_TYPE:
            transport, base = "raw", name
        elif msgtype == COMPRESSED_IMAGE_TYPE and name.endswith("/compressed"):
            transport, base = "compressed", name[: -len("/compressed")]
        else:
            continue
        ns, leaf = base.rsplit("/", 1) if "/" in base else ("", base)
        names = ["camera_info_rect", "camera_info"] if leaf == "image_rect" else ["camera_info"]
        info = next((f"{ns}/{n}" for n in names if types.get(f"{ns}/{n}") == CAMERA_INFO_TYPE),
                    None)
        out.append(CameraTopics(name, transport, info, ns))
    return out


def find_camera_topics(
    topics: Mapping[str, Any],
    *,
    rectified: bool = False,
    namespace: str | None = None,
    image_topic: str | None = None,
) -> CameraTopics:
    """The camera stream a pipeline should read from a bag, found by itself.

    Preference: ``<ns>/image_raw`` (sensor_msgs/Image), then ``<ns>/image_raw/compressed``
    (sensor_msgs/CompressedImage, image_transport's compressed format) — raw first, it needs
    no decoding; with ``rectified`` (no rectify stage) ``image_rect`` before ``image_raw``.
    Failing those, any image topic whose namespace has a ``camera_info`` (e.g. a driver's
    ``…/image/compressed``). Among streams of one name, one with a ``camera_info`` beside it
    wins (a colour camera over its ``…/depth/image_raw``); other ties by topic name.

    Args:
        topics: topic name -> :class:`TopicMeta`, :func:`bag_info` topic dict or type name.
        rectified: the images are used as they come (no rectify stage); camera_info is then
            optional.
        namespace: only streams in this namespace (``/camera``).
        image_topic: exactly this topic (an Image or CompressedImage topic).

    Raises:
        ValueError: one line naming what was looked for and the image topics there are.
    """
    streams = image_streams(topics)
    if image_topic is not None:
        chosen = [s for s in streams if s.image == image_topic]
        if not chosen:
            raise ValueError(
                f"{image_topic} is not a sensor_msgs/Image or …/compressed "
                f"sensor_msgs/CompressedImage topic of the bag (image topics: "
                f"{', '.join(s.image for s in streams) or 'none'})")
        return chosen[0]
    if namespace is not None:
        ns = "/" + namespace.strip("/") if namespace.strip("/") else ""
        streams_ns = [s for s in streams if s.namespace == ns]
    else:
        streams_ns = streams
    leaves = ["image_rect", "image_raw"] if rectified else ["image_raw"]
    for leaf in leaves:
        named = [s for s in streams_ns if s.base.rsplit("/", 1)[-1] == leaf]
        if named:  # a camera beside its camera_info first (not e.g. <ns>/depth/image_raw)
            return sorted(named, key=lambda s: (s.camera_info is None, s.transport != "raw",
                                                s.image))[0]
    usable = [s for s in streams_ns if rectified or s.camera_info is not None]
    if usable:
        return sorted(usable, key=lambda s: (s.transport != "raw", s.image))[0]
    where = f" in namespace {namespace}" if namespace is not None else ""
    wanted = " or ".join(f"<ns>/{leaf} (Image) or <ns>/{leaf}/compressed (CompressedImage)"
                         for leaf in leaves)
    raise ValueError(
        f"no camera image topic{where}: expected {wanted}"
        + ("" if rectified else " with a <ns>/camera_info")
        + f"; image topics in the bag: {', '.join(s.image for s in streams) or 'none'}")


def _qos_to_dict(qos: Qos) -> dict[str, Any]:
    return {
        "history": qos.history.name.lower(),
        "depth": int(qos.depth),
        "reliability": qos.reliability.name.lower(),
        "durability": qos.durability.name.lower(),
    }


def bag_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Summary of a bag as plain python (JSON-serialisable).

    Returns:
        ``{"path", "storage", "message_count", "start_ns", "end_ns", "duration_ns",
        "duration_s", "topics": {name: {"type", "count", "qos": [...]}}, "cameras": [...]}``;
        ``start_ns`` and ``end_ns`` are the first/last message timestamps (None when empty);
        ``cameras`` lists the image streams (:func:`image_streams`): ``{"image",
        "transport", "camera_info", "frames"}`` plus, for compressed ones, the ``format`` of
        the first message (e.g. ``"bgr8; jpeg compressed bgr8"``). ``storage`` is
        ``rosbag1`` for a ROS 1 bag.
    """
    with BagReader(path) as reader:
        span = reader.time_range()
        start, end = span if span else (None, None)
        duration = (end - start) if span else 0
        topics = {
            name: {"type": meta.msgtype, "count": meta.count,
                   "qos": [_qos_to_dict(q) for q in meta.qos]}
            for name, meta in reader.topics.items()
        }
        cameras = []
        for cam in image_streams(reader.topics):
            entry: dict[str, Any] = {"image": cam.image, "transport": cam.transport,
                                     "camera_info": cam.camera_info,
                                     "frames": topics[cam.image]["count"]}
            if cam.transport == "compressed":
                entry["format"] = _first_format(reader, cam.image)
            cameras.append(entry)
        return {
            "path": str(reader.path),
            "storage": reader.storage,
            "message_count": reader.message_count,
            "start_ns": start,
            "end_ns": end,
            "duration_ns": duration,
            "duration_s": duration / 1e9,
            "topics": topics,
            "cameras": cameras,
        }


def _first_format(reader: BagReader, topic: str) -> str | None:
    """``format`` of the first CompressedImage on ``topic`` (None if unreadable or empty)."""
    for message in reader.messages([topic]):
        try:
            return str(reader.deserialize(message.rawdata, message.msgtype).format)
        except Exception:  # noqa: BLE001 - a summary; process/play report bad messages
            return None
    return None
