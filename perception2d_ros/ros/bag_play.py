"""Play a rosbag2 bag (MCAP/sqlite3, read with ``rosbags``) onto ROS 2 topics with rclpy.

The stored CDR bytes are published unchanged (rclpy publishers accept serialised ``bytes``),
with the recorded inter-message timing divided by ``rate``. QoS follows the project
convention: best effort / volatile / depth 5 (sensor data) for everything except topics whose
name ends in ``label_info``, which are reliable + transient local (latched).

:func:`play` creates its own rclpy context and node, so it can run in a thread next to other
rclpy users (e.g. :func:`perception2d_ros.ros.bag_record.record` in a test).
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from perception2d_ros.io.bag_reader import BagReader
from perception2d_ros.io.bag_types import default_qos_name

__all__ = ["play", "get_msg_class", "ros_node", "signals_set", "qos_for_topic"]


def get_msg_class(msgtype: str) -> type:
    """Import the rclpy message class for ``pkg/msg/Type`` (or ``pkg/Type``).

    Raises:
        ValueError: malformed type name.
        ImportError: the interface package is not importable in this Python.
    """
    parts = msgtype.split("/")
    if len(parts) == 2:
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"malformed message type {msgtype!r}; expected pkg/msg/Type")
    pkg, kind, name = parts
    try:
        module = importlib.import_module(f"{pkg}.{kind}")
        return getattr(module, name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(
            f"message type {msgtype} is not importable in this Python ({exc}); install or "
            f"build the {pkg} interface package, or leave its topics out"
        ) from exc


def qos_for_topic(topic: str, reliable: bool = False, depth: int = 5) -> Any:
    """Publisher QoS: latched for ``*label_info``, else sensor data (or reliable if asked)."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    if default_qos_name(topic) == "latched":
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                          reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.TRANSIENT_LOCAL)
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.VOLATILE,
    )


@contextmanager
def ros_node(node_name: str, ros_args: Sequence[str] | None = None) -> Iterator[Any]:
    """A node in a private rclpy context (no rclpy signal handlers), shut down on exit.

    Args:
        node_name: node name.
        ros_args: extra ROS arguments, with or without the leading ``--ros-args``
            (e.g. ``["-r", "/camera/image_raw:=/cam/image"]``).
    """
    import rclpy
    from rclpy.context import Context
    from rclpy.signals import SignalHandlerOptions

    args = list(ros_args or [])
    if args and args[0] != "--ros-args":
        args = ["--ros-args", *args]
    context = Context()
    rclpy.init(args=["perception2d", *args], context=context,
               signal_handler_options=SignalHandlerOptions.NO)
    node = None
    try:
        node = rclpy.create_node(node_name, context=context, start_parameter_services=False)
        yield node
    finally:
        if node is not None:
            node.destroy_node()
        if context.ok():
            rclpy.shutdown(context=context)


@contextmanager
def signals_set(event: threading.Event, enabled: bool = True) -> Iterator[None]:
    """Set ``event`` on SIGINT/SIGTERM while inside (main thread only; else a no-op)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
        event.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _wait_for_subscribers(
    publishers: dict[str, Any], count: int, timeout: float, stop: threading.Event
) -> None:
    """Block until every publisher has ``count`` matched subscriptions (or raise)."""
    if count <= 0:
        return
    deadline = time.monotonic() + timeout
    while True:
        have = {topic: pub.get_subscription_count() for topic, pub in publishers.items()}
        if all(n >= count for n in have.values()) or stop.is_set():
            return
        if time.monotonic() >= deadline:
            missing = {t: n for t, n in have.items() if n < count}
            raise TimeoutError(
                f"waited {timeout:g} s for {count} subscriber(s) per topic; still short: "
                + ", ".join(f"{t} has {n}" for t, n in sorted(missing.items()))
            )
        stop.wait(0.02)


def play(
    path: str | os.PathLike[str],
    rate: float = 1.0,
    loop: bool = False,
    topics: Iterable[str] | None = None,
    *,
    wait_subscribers: int = 0,
    wait_timeout: float = 10.0,
    reliable: bool = False,
    qos_depth: int = 5,
    linger: float = 0.5,
    stop_event: threading.Event | None = None,
    ros_args: Sequence[str] | None = None,
    node_name: str = "perception2d_bag_play",
    handle_signals: bool = False,
    progress: bool = False,
    msg_dirs: Iterable[str | os.PathLike[str]] = (),
) -> dict[str, int]:
    """Publish the messages of a bag with their recorded timing.

    Args:
        path: bag directory or ``.mcap`` / ``.db3`` file.
        rate: playback speed factor (2.0 = twice as fast), > 0.
        loop: start again at the end until stopped (``stop_event`` or a signal).
        topics: only these topics (default all); unknown names raise ``KeyError``.
        wait_subscribers: before the first message, wait until each played topic has this
            many matched subscriptions (0 = do not wait).
        wait_timeout: bound on that wait in seconds; ``TimeoutError`` when exceeded.
        reliable: publish non-latched topics reliable instead of best effort.
        qos_depth: history depth of non-latched publishers.
        linger: seconds to keep the publishers alive after the last message (reliable ones
            also wait for acknowledgement up to this long) so that in-flight data arrives.
        stop_event: set it (from another thread) to stop early.
        ros_args: extra ROS arguments (remappings, ...).
        node_name: name of the player node.
        handle_signals: stop cleanly on SIGINT/SIGTERM (main thread only).
        progress: show a tqdm progress bar on stderr.
        msg_dirs: interface package dirs for types the bag does not define itself.

    Returns:
        Messages published per topic (all loops together).
    """
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if wait_subscribers < 0:
        raise ValueError(f"wait_subscribers must be >= 0, got {wait_subscribers}")
    if not wait_timeout > 0:
        raise ValueError(f"wait_timeout must be > 0, got {wait_timeout}")
    if qos_depth < 1:
        raise ValueError(f"qos_depth must be >= 1, got {qos_depth}")
    from tqdm import tqdm

    stop = stop_event if stop_event is not None else threading.Event()
    with BagReader(path, msg_dirs=msg_dirs) as reader:
        metas = reader.topics
        selected = sorted(metas) if topics is None else list(dict.fromkeys(topics))
        if unknown := [t for t in selected if t not in metas]:
            raise KeyError(f"topics {unknown} are not in {path} (has {sorted(metas)})")
        if not selected:
            raise ValueError("no topics to play")
        classes = {t: get_msg_class(metas[t].msgtype) for t in selected}
        total = sum(metas[t].count for t in selected)
        counts = {t: 0 for t in selected}

        with signals_set(stop, handle_signals), ros_node(node_name, ros_args) as node:
            publishers = {
                t: node.create_publisher(classes[t], t, qos_for_topic(t, reliable, qos_depth))
                for t in selected
            }
            _wait_for_subscribers(publishers, wait_subscribers, wait_timeout, stop)
            bar = tqdm(total=total, desc="play", unit="msg", file=sys.stderr,
                       disable=not progress, leave=False)
            try:
                while not stop.is_set():
                    bag_start: int | None = None
                    wall_start = time.monotonic()
                    bar.reset(total=total)
                    for message in reader.messages(selected):
                        if bag_start is None:
                            bag_start = message.timestamp_ns
                        due = wall_start + (message.timestamp_ns - bag_start) / 1e9 / rate
                        delay = due - time.monotonic()
                        if delay > 0 and stop.wait(delay):
                            break
                        if stop.is_set():
                            break
                        publishers[message.topic].publish(message.rawdata)
                        counts[message.topic] += 1
                        bar.update(1)
                    if not loop or bag_start is None:
                        break
            finally:
                bar.close()
                deadline = time.monotonic() + max(0.0, linger)
                for topic, pub in publishers.items():
                    if qos_for_topic(topic, reliable).reliability.name == "RELIABLE":
                        pub.wait_for_all_acked(_duration(max(0.0, deadline - time.monotonic())))
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    time.sleep(remaining)  # let best-effort data in flight arrive
    return counts


def _duration(seconds: float) -> Any:
    from rclpy.duration import Duration

    return Duration(nanoseconds=int(seconds * 1e9))
