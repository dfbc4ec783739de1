"""Reading bags, ROS-free: rosbag2 directories, bare ``.mcap`` / ``.db3`` files and ROS 1
``.bag`` files (:class:`BagReader`), every message coming out as ROS 2 CDR.

ROS 1 bags (:class:`BagReader` recognises them by their ``#ROSBAG V2.0`` header) are read with
``rosbags.rosbag1``; every message is converted to the ROS 2 type of the same name (ROS 1
``sensor_msgs/CompressedImage`` -> ``sensor_msgs/msg/CompressedImage``, ``CameraInfo``'s
``D, K, R, P`` -> ``d, k, r, p``, ``Header.seq`` dropped) with rosbags' own converter, the one
``rosbags-convert`` uses, so consumers see the same CDR bytes as from a ROS 2 bag.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rosbags.interfaces import ConnectionExtRosbag2, MessageDefinitionFormat, Qos
from rosbags.rosbag1 import Reader as Ros1Reader
from rosbags.rosbag2 import Reader
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

from perception2d_ros.io.bag_types import make_typestore, qos_preset

__all__ = ["BagMessage", "BagReader", "TopicMeta", "is_ros1_bag"]

_ROS1_MAGIC = b"#ROSBAG V2.0"


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

