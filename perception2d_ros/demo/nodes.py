"""Running the nodes for the demo: ``perception2d bringup`` in its own process, the input bag
played into it (at the recorded timing, or in lockstep with the detections) and its outputs
recorded, with progress bars.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from perception2d_ros.demo.inputs import log


def play_lockstep(bag: Path, topics: list[str], image_topic: str, outputs: Any,
                  reliable: bool, timeout: float) -> int:
    """Play ``topics`` of ``bag`` in order, each image only once ``outputs()`` (detections
    recorded so far) has caught up with the images before it: no frame is ever skipped by a
    busy machine (CI). Returns the images played."""
    import sys as _sys

    from tqdm import tqdm

    from perception2d_ros.io.bag_reader import BagReader
    from perception2d_ros.ros.bag_play import (_wait_for_subscribers, get_msg_class,
                                               qos_for_topic, ros_node)

    stop = threading.Event()
    with BagReader(bag) as reader, ros_node("perception2d_demo_play") as node:
        metas = reader.topics
        pubs = {t: node.create_publisher(get_msg_class(metas[t].msgtype), t,
                                         qos_for_topic(t, reliable)) for t in topics}
        _wait_for_subscribers(pubs, 1, timeout, stop)
        images = 0
        bar = tqdm(total=metas[image_topic].count, desc="play (lockstep)", unit="frame",
                   file=_sys.stderr, leave=False)
        for m in reader.messages(topics):
            if m.topic == image_topic:
                deadline = time.monotonic() + timeout
                while outputs() < images and time.monotonic() < deadline:
                    time.sleep(0.005)
                images += 1
                bar.update(1)
            pubs[m.topic].publish(m.rawdata)
        bar.close()
        for pub in pubs.values():
            if reliable:
                pub.wait_for_all_acked(_seconds(2.0))
    return images


def _seconds(s: float) -> Any:
    from rclpy.duration import Duration

    return Duration(nanoseconds=int(s * 1e9))


def run_nodes(bag: Path, cam: dict[str, Any], params_file: Path, out_bag: Path,
              record_topics: list[str], play_topics: list[str], pipeline: bool, rate: float,
              reliable: bool, timeout: float, lockstep: bool = False) -> None:
    """bag play -> ``perception2d bringup`` -> bag record, with progress bars."""
    from tqdm import tqdm

    from perception2d_ros.io.bag_types import find_interface_dirs
    from perception2d_ros.ros.bag_play import play
    from perception2d_ros.ros.bag_record import record

    ns = cam["ns"]
    bringup = subprocess.Popen(
        [sys.executable, "-m", "perception2d_ros.cli.main", "bringup", "--params-file",
         str(params_file), "--namespace", ns, "--pipeline", "true" if pipeline else "false",
         "--image-topic", cam["image_name"], "--image-transport", cam["transport"]],
        start_new_session=True)
    stop = threading.Event()
    ready = threading.Event()
    rec_result: dict[str, Any] = {}
    live: Counter[str] = Counter()

    def recorder() -> None:
        try:
            rec_result.update(record(out_bag, record_topics, stop_event=stop,
                                     on_ready=ready.set, topic_timeout=timeout, overwrite=True,
                                     msg_dirs=find_interface_dirs(),
                                     on_message=lambda t: live.update([t])))
        except Exception as exc:  # noqa: BLE001 - reported below
            rec_result["error"] = exc
            ready.set()

    rec = threading.Thread(target=recorder, daemon=True)
    rec.start()
    det_topic = f"{ns.rstrip('/')}/detections"
    try:
        log("waiting for the nodes (model load) and the recorder")
        if not ready.wait(timeout) or "error" in rec_result:
            raise RuntimeError(f"nodes did not come up: {rec_result.get('error', 'timeout')}")
        log(f"playing {cam['frames']} frames through the nodes"
            + (" (lockstep: each frame after the previous one's detections)" if lockstep
               else ""))
        if lockstep:
            play_lockstep(bag, play_topics, cam["image_topic"], lambda: live[det_topic],
                          reliable=reliable, timeout=timeout)
        else:
            play(bag, rate=rate, wait_subscribers=1, wait_timeout=timeout, progress=True,
                 reliable=reliable, topics=play_topics)
        deadline = time.monotonic() + 30
        bar = tqdm(total=cam["frames"], desc="outputs", unit="frame", file=sys.stderr,
                   leave=False)
        last = 0
        while time.monotonic() < deadline:
            got = live[det_topic]
            bar.update(max(0, got - last))
            last = max(last, got)
            if got >= cam["frames"]:
                break
            time.sleep(0.1)
        bar.close()
        # one more /diagnostics period so the latency covers every frame
        t_diag = live["/diagnostics"]
        end = time.monotonic() + 2.5
        while live["/diagnostics"] <= t_diag and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        stop.set()
        rec.join(timeout=15)
        if bringup.poll() is None:
            os.killpg(bringup.pid, signal.SIGINT)
            try:
                bringup.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(bringup.pid, signal.SIGKILL)
    if "error" in rec_result:
        raise RuntimeError(f"recording failed: {rec_result['error']}")

