"""Tracking with CLIP downstream, in one pipeline_node and as separate nodes (detector_node →
track_node → clip_node, the chain bringup builds): both publish the same tracked detections —
track ids in Detection2D.id, the track's accumulated CLIP labels in `detections`, the frame's
own in `clip/detections`. CLIP: the official ViT-B/32 architecture with seeded random
weights (no pretrained weights offline), exported through our own path; frames: the real
Udacity highway clip."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("rclpy", reason="node tests need rclpy (installed by `make test`)")
pytest.importorskip("open_clip", reason="CLIP export needs open_clip_torch (test extra)")

from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from vision_msgs.msg import Detection2DArray  # noqa: E402

from perception2d_ros.ros import conversions as conv  # noqa: E402
from perception2d_ros.ros.perception_node import PerceptionNode  # noqa: E402
from ros_harness import BEST_EFFORT, RELIABLE, RosHarness, wait_for  # noqa: E402
from test_clip_labeler import clip_bundle  # noqa: E402  (shared session export)

pytestmark = pytest.mark.ros
CLIP = Path(__file__).resolve().parents[1] / "data" / "realcam" / "tracking" / "udacity_highway_640"
VOCAB = ["a car", "a truck", "a tree", "a road sign"]
N_FRAMES = 5


@pytest.fixture(scope="module")
def b32(tmp_path_factory):
    return clip_bundle(tmp_path_factory, "ViT-B-32", "openai-torchscript", ".pt")


@pytest.fixture()
def harness(b32, monkeypatch):
    monkeypatch.setenv("PERCEPTION2D_CACHE_DIR", str(b32["cache"]))
    h = RosHarness()
    yield h
    h.close()


def _hyps(d) -> list[tuple[str, float]]:
    return [(h.hypothesis.class_id, h.hypothesis.score) for h in d.results]


def test_tracked_clip_labels_pipeline_and_separate_nodes_agree(harness, b32, tmp_path):
    import yaml

    from perception2d_ros.ros.bringup import node_list

    params = {"/**": {"ros__parameters": {
        "stages": ["detect", "track", "clip"], "input": "rect", "clip.frame_labels": False,
        "clip.model": str(b32["exported"]["meta"]), "clip.templates": ["{}"],
        "clip.allow_outside_models_dir": True,  # the test's export lives in a temp folder
        "vocabulary": VOCAB, "clip.top_k": len(VOCAB), "track.min_hits": 1, "detect.conf_threshold": 0.1}}}
    pfile = tmp_path / "p.yaml"
    pfile.write_text(yaml.safe_dump(params))
    out = {}
    for mode, ns in ((True, "/pipe"), (False, "/sep")):
        specs = node_list(pipeline=mode, params_file=pfile)
        assert [s.kind for s in specs] == (["pipeline_node"] if mode else
                                           ["detector_node", "track_node", "clip_node"])
        for spec in specs:
            args = spec.ros_args(ns, False, "warn")
            if spec.kind == "pipeline_node":
                args += ["-p", "input:=rect"]
            harness.add_node(PerceptionNode(spec.kind, context=harness.context, cli_args=args))
        out[ns] = (harness.subscribe(Detection2DArray, f"{ns}/detections", RELIABLE),
                   harness.subscribe(Detection2DArray, f"{ns}/clip/detections", RELIABLE))
    pubs = {"/pipe": harness.publisher(Image, "/pipe/image_rect", BEST_EFFORT),
            "/sep": harness.publisher(Image, "/sep/image_raw", BEST_EFFORT)}
    for ns, pub in pubs.items():
        assert harness.wait_matched(pub, n=1 if ns == "/pipe" else 2)
    for i, path in enumerate(sorted(CLIP.glob("*.jpg"))[:N_FRAMES]):
        h = Header(frame_id="cam")
        h.stamp.sec, h.stamp.nanosec = 1_700_000_000, i * 40_000_000
        msg = conv.array_to_image_msg(cv2.imread(str(path)), "bgr8", h)
        for ns, pub in pubs.items():
            n = len(out[ns][1])
            pub.publish(msg)
            assert wait_for(lambda: len(out[ns][1]) > n, 60), f"{ns}: no output for frame {i}"
    assert wait_for(lambda: all(len(o[0]) == N_FRAMES for o in out.values()), 20)
    (pd, pf), (sd, sf) = out["/pipe"], out["/sep"]
    for k, (a, b, fa, fb) in enumerate(zip(pd, sd, pf, sf)):
        assert a.header == b.header == fa.header
        assert [d.id for d in a.detections] == [d.id for d in b.detections] == \
            [d.id for d in fa.detections]
        assert len(a.detections) >= 2
        for da, db in zip(a.detections, b.detections):
            assert [n for n, _ in _hyps(da)] == [n for n, _ in _hyps(db)]
            np.testing.assert_allclose([s for _, s in _hyps(da)], [s for _, s in _hyps(db)],
                                       atol=1e-4)
        for d, f in zip(a.detections, fa.detections):
            assert _hyps(d)[0] == _hyps(f)[0]      # detector class + score first in both
            if k == 0:   # a track's first frame: its mean is this frame's probabilities
                np.testing.assert_allclose([s for _, s in _hyps(d)[1:]],
                                           [s for _, s in _hyps(f)[1:]], atol=1e-5)
    # later frames: the track's label is the running mean of its frames' probabilities
    ids = [d.id for d in pd[0].detections]
    for tid in ids:
        per_frame = []
        for fa in pf:
            d = next((x for x in fa.detections if x.id == tid), None)
            if d is not None:
                per_frame.append(dict(_hyps(d)[1:]))
        last = next(x for x in pd[-1].detections if x.id == tid)
        assert len(_hyps(last)) == 1 + len(VOCAB)
        for name, score in _hyps(last)[1:]:   # top_k = the whole vocabulary: exact mean
            assert score == pytest.approx(np.mean([p[name] for p in per_frame]), abs=1e-5)
