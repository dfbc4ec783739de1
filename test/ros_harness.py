"""Real rclpy pub/sub for node tests: an isolated context, a multi-threaded executor in a
background thread, collectors with steady-clock waits (never fixed sleeps)."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import rclpy
from rclpy.context import Context
from rclpy.node import Node
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy)

from perception2d_ros.ros.perception_node import make_executor

RELIABLE = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                      history=HistoryPolicy.KEEP_LAST)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
BEST_EFFORT = QoSProfile(depth=100, reliability=ReliabilityPolicy.BEST_EFFORT,
                         history=HistoryPolicy.KEEP_LAST)


def wait_for(pred: Callable[[], bool], timeout: float = 20.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


class RosHarness:
    def __init__(self) -> None:
        self.context = Context()
        rclpy.init(context=self.context)
        # the nodes' own executor (single-threaded): rclpy's MultiThreadedExecutor re-submits
        # ready callbacks many times and delays them by up to ~1 s (docs/BENCHMARKS.md)
        self.executor = make_executor(self.context)
        self.node = Node("test_harness", context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()
        self.received: dict[str, list[Any]] = {}

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except Exception:  # executor shut down while spinning
            pass

    def add_node(self, node: Any) -> Any:
        self.executor.add_node(node)
        return node

    def subscribe(self, msg_type: Any, topic: str, qos: QoSProfile = RELIABLE) -> list[Any]:
        bucket = self.received.setdefault(topic, [])
        self.node.create_subscription(msg_type, topic, bucket.append, qos)
        return bucket

    def publisher(self, msg_type: Any, topic: str, qos: QoSProfile = RELIABLE) -> Any:
        return self.node.create_publisher(msg_type, topic, qos)

    def wait_matched(self, pub: Any, n: int = 1, timeout: float = 10.0) -> bool:
        return wait_for(lambda: pub.get_subscription_count() >= n, timeout)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        for n in list(self.executor.get_nodes()):
            n.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(timeout=5.0)
