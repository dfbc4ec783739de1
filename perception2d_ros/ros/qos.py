"""QoS profiles of the nodes' topics: results (reliable, keep last 10), latched label info
(transient local) and published images (reliable, keep last 5)."""
from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL,
                     history=HistoryPolicy.KEEP_LAST)
RESULTS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE,
                     history=HistoryPolicy.KEEP_LAST)
# Images we publish are offered reliable (keep last 5): compatible with best-effort
# subscribers (RViz, sensor-data QoS) and reliable ones (recorders, reliable chains).
IMAGES_OUT = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE,
                        history=HistoryPolicy.KEEP_LAST)
