"""Record ROS 2 topics into an MCAP (or sqlite3) bag with rclpy raw subscriptions.

Types are resolved from the ROS graph (waiting, bounded, until each topic has a publisher);
messages are stored as the received CDR bytes with the receive time (node clock) as the bag
timestamp. QoS: best effort / volatile by default, which matches reliable and best-effort
publishers alike; ``*label_info`` topics are recorded reliable + transient local so the latched
message published before the recorder started still arrives (falling back to what the
publishers offer when they are not latched, so the subscription always matches).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from perception2d_ros.io.bag_types import default_qos_name, qos_preset
from perception2d_ros.io.bag_writer import BagWriter
from perception2d_ros.ros.bag_play import get_msg_class, ros_node, signals_set

__all__ = ["record"]


def _resolve_types(node: Any, topics: list[str], timeout: float,
                   stop: threading.Event) -> dict[str, str]:
    """Wait until every topic has a publisher in the graph; returns topic -> type."""
    deadline = time.monotonic() + timeout
    while True:
        graph = dict(node.get_topic_names_and_types())
        found: dict[str, str] = {}
        for topic in topics:
            types = graph.get(topic) or []
            if len(types) > 1:
                raise ValueError(f"topic {topic} is published with several types {types}")
            if types and node.get_publishers_info_by_topic(topic):
                found[topic] = types[0]
        if len(found) == len(topics):
            return found
        if stop.is_set():
            raise InterruptedError("stopped while waiting for topics")
        if time.monotonic() >= deadline:
            missing = [t for t in topics if t not in found]
            raise TimeoutError(f"no publisher appeared within {timeout:g} s on {missing}")
        stop.wait(0.05)


def _subscription_qos(node: Any, topic: str, depth: int) -> tuple[Any, list[Any]]:
    """Subscriber QoS for ``topic`` and the offered QoS (rosbags) to store in the bag."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    offered = [info.qos_profile for info in node.get_publishers_info_by_topic(topic)]
    all_reliable = bool(offered) and all(
        q.reliability == ReliabilityPolicy.RELIABLE for q in offered)
    all_latched = bool(offered) and all(
        q.durability == DurabilityPolicy.TRANSIENT_LOCAL for q in offered)
    if default_qos_name(topic) == "latched":
        reliability = ReliabilityPolicy.RELIABLE if all_reliable else ReliabilityPolicy.BEST_EFFORT
        durability = (DurabilityPolicy.TRANSIENT_LOCAL if all_latched
                      else DurabilityPolicy.VOLATILE)
    else:  # adaptive, like rosbag2: reliable when every publisher offers it, else best effort
        reliability = ReliabilityPolicy.RELIABLE if all_reliable else ReliabilityPolicy.BEST_EFFORT
        durability = DurabilityPolicy.VOLATILE
    qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=reliability,
                     durability=durability)
    # What the publishers offer, in the bag's terms (first publisher; depth as offered).
    stored = None
    if offered:
        first = offered[0]
        name = ("latched" if first.durability == DurabilityPolicy.TRANSIENT_LOCAL
                else "reliable" if first.reliability == ReliabilityPolicy.RELIABLE
                else "sensor_data")
        stored = qos_preset(name, depth=int(first.depth) if first.depth else None)
    return qos, stored or qos_preset(default_qos_name(topic))


def record(
    path: str | os.PathLike[str],
    topics: Iterable[str],
    *,
    duration: float | None = None,
    max_messages: int | None = None,
    topic_timeout: float = 10.0,
    storage: str | None = None,
    overwrite: bool = False,
    qos_depth: int = 50,
    stop_event: threading.Event | None = None,
    on_ready: Callable[[], None] | None = None,
    ros_args: Sequence[str] | None = None,
    node_name: str = "perception2d_bag_record",
    handle_signals: bool = False,
    progress: bool = False,
    msg_dirs: Iterable[str | os.PathLike[str]] = (),
    on_message: Callable[[str], None] | None = None,
) -> dict[str, int]:
    """Record ``topics`` into a bag until stopped.

    Stops on ``stop_event``, SIGINT/SIGTERM (with ``handle_signals``), after ``duration``
    seconds of recording or after ``max_messages`` messages in total, whichever comes first.
    The bag is written atomically when recording ends (also after a stop or a signal).

    Args:
        path: output bag (``*.mcap`` single file, ``*.db3``, or a rosbag2 directory).
        topics: topic names (relative names are taken as absolute).
        duration: seconds to record, counted from when the subscriptions exist.
        max_messages: total messages after which recording stops.
        topic_timeout: seconds to wait for every topic to appear in the graph.
        storage: ``"mcap"`` (default unless ``.db3``) or ``"sqlite3"``.
        overwrite: replace an existing output.
        qos_depth: subscriber history depth.
        stop_event: set it (from another thread) to stop recording.
        on_ready: called once all subscriptions exist and have matched a publisher (or
            ``topic_timeout`` passed), i.e. when it is safe to start publishing.
        ros_args: extra ROS arguments (remappings, ``use_sim_time``...).
        node_name: name of the recorder node.
        handle_signals: stop cleanly on SIGINT/SIGTERM (main thread only).
        progress: show a tqdm counter on stderr.
        msg_dirs: interface package dirs for types not in the ROS2_KILTED typestore.
        on_message: called with the topic name after each recorded message (progress).

    Returns:
        Messages recorded per topic.
    """
    names = [t if t.startswith("/") else f"/{t}" for t in dict.fromkeys(topics)]
    if not names:
        raise ValueError("no topics to record")
    if duration is not None and not duration > 0:
        raise ValueError(f"duration must be > 0 s, got {duration}")
    if max_messages is not None and max_messages < 1:
        raise ValueError(f"max_messages must be >= 1, got {max_messages}")
    if not topic_timeout > 0:
        raise ValueError(f"topic_timeout must be > 0, got {topic_timeout}")
    if qos_depth < 1:
        raise ValueError(f"qos_depth must be >= 1, got {qos_depth}")
    from rclpy.executors import SingleThreadedExecutor
    from tqdm import tqdm

    stop = stop_event if stop_event is not None else threading.Event()
    writer = BagWriter(path, storage, msg_dirs=msg_dirs, overwrite=overwrite)
    if writer.path.exists() and not overwrite:  # fail before waiting on the graph
        raise FileExistsError(f"{writer.path} exists already (use overwrite to replace it)")
    with signals_set(stop, handle_signals), ros_node(node_name, ros_args) as node:
        names = [node.resolve_topic_name(t) for t in names]
        types = _resolve_types(node, names, topic_timeout, stop)
        classes = {t: get_msg_class(types[t]) for t in names}
        executor = SingleThreadedExecutor(context=node.context)
        executor.add_node(node)
        bar = tqdm(total=max_messages, desc="record", unit="msg", file=sys.stderr,
                   disable=not progress, leave=False)
        done = threading.Event()
        clock = node.get_clock()
        with writer:
            subscriptions = []
            for topic in names:
                qos, offered = _subscription_qos(node, topic, qos_depth)
                writer.add_topic(topic, types[topic], qos=offered)

                def callback(data: bytes, _topic: str = topic) -> None:
                    if done.is_set():
                        return
                    writer.write(_topic, clock.now().nanoseconds, data)
                    bar.update(1)
                    if on_message is not None:
                        on_message(_topic)
                    if max_messages is not None and writer.message_count >= max_messages:
                        done.set()

                subscriptions.append(node.create_subscription(
                    classes[topic], topic, callback, qos, raw=True))
            match_deadline = time.monotonic() + topic_timeout
            while (not stop.is_set() and time.monotonic() < match_deadline
                   and not all(s.get_publisher_count() > 0 for s in subscriptions)):
                executor.spin_once(timeout_sec=0.01)
            if on_ready is not None:
                on_ready()
            end = None if duration is None else time.monotonic() + duration
            try:
                while not (stop.is_set() or done.is_set()):
                    if end is not None and time.monotonic() >= end:
                        break
                    timeout = 0.05 if end is None else max(0.0, min(0.05, end - time.monotonic()))
                    executor.spin_once(timeout_sec=timeout)
            finally:
                bar.close()
                for sub in subscriptions:
                    node.destroy_subscription(sub)
                executor.shutdown(timeout_sec=1.0)
            counts = dict(writer.counts)
    return counts
