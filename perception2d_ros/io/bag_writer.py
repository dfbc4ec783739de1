"""Writing rosbag2 bags (MCAP by default, sqlite3 optional) with ``rosbags``, ROS-free.

Output layout (:class:`BagWriter`):

* ``OUT`` ending in ``.mcap`` / ``.db3`` -> one bare storage file (``ros2 bag play OUT.mcap``,
  Foxglove and ``mcap_ros2`` read it directly);
* any other ``OUT`` -> a rosbag2 directory ``OUT/`` with ``metadata.yaml`` and
  ``OUT/<name>.mcap`` (or ``.db3``), the layout ``ros2 bag record`` produces.

Writing is atomic: data goes to a hidden sibling directory and is moved into place on a
successful :meth:`BagWriter.close`; an exception inside the ``with`` block discards it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rosbags.interfaces import Qos
from rosbags.rosbag2 import StoragePlugin, Writer

from perception2d_ros.io.bag_types import (
    _ensure_msgtype,
    default_qos_name,
    make_typestore,
    qos_preset,
)

__all__ = ["STORAGES", "BagWriter", "storage_for_path"]

#: Storage identifiers accepted by :class:`BagWriter`.
STORAGES: tuple[str, ...] = ("mcap", "sqlite3")
_SUFFIX = {"mcap": ".mcap", "sqlite3": ".db3"}
_PLUGIN = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
_BAG_VERSION = 9  # rosbag2 metadata version written by Jazzy/Kilted


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

