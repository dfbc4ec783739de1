"""CLIP and LSeg as pipeline stages inside a real pipeline_node (rclpy pub/sub): labels on
detections, whole-frame labels, per-pixel label maps, LabelInfo that follows runtime
vocabulary changes. Weights: the official architectures with seeded random weights (no
pretrained CLIP/LSeg weights exist offline), exported through our own path."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

pytest.importorskip("rclpy", reason="node tests need rclpy (installed by `make test`)")
pytest.importorskip("open_clip", reason="CLIP export needs open_clip_torch (test extra)")

from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from vision_msgs.msg import Classification, Detection2DArray, LabelInfo  # noqa: E402

from perception2d_ros.engines.factory import EngineConfig  # noqa: E402
from perception2d_ros.ros import conversions as conv  # noqa: E402
from perception2d_ros.ros.perception_node import PerceptionNode  # noqa: E402
from ros_harness import BEST_EFFORT, LATCHED, RELIABLE, RosHarness, wait_for  # noqa: E402
from test_clip_labeler import clip_bundle  # noqa: E402  (shared session export)

pytestmark = pytest.mark.ros
VOCAB_A = ["a person", "a bus", "a dog", "a bicycle", "a pizza", "a cat"]
VOCAB_B = ["a tree", "a car", "a kitchen", "a horse"]
CPU = EngineConfig(backend="onnxruntime", device="cpu")


@pytest.fixture(scope="module")
def b32(tmp_path_factory):
    return clip_bundle(tmp_path_factory, "ViT-B-32", "openai-torchscript", ".pt")


@pytest.fixture(scope="module")
def lseg_small(tmp_path_factory):
    from perception2d_ros.models.lseg.export import export_onnx

    return export_onnx("lseg_test_small", None, tmp_path_factory.mktemp("lseg"), seed=0,
                       input_size=256)


@pytest.fixture()
def harness(b32, monkeypatch):
    monkeypatch.setenv("PERCEPTION2D_CACHE_DIR", str(b32["cache"]))
    h = RosHarness()
    yield h
    h.close()


def _frames(data_dir, n):
    files = [data_dir / "coco" / "images" / f for f in
             ("000000397133.jpg", "000000037777.jpg", "000000252219.jpg")][:n]
    from std_msgs.msg import Header

    out = []
    for i, f in enumerate(files):
        h = Header(frame_id="cam")
        h.stamp.sec, h.stamp.nanosec = 1_700_000_000 + i, 0
        out.append((cv2.imread(str(f)), conv.array_to_image_msg(cv2.imread(str(f)), "bgr8", h)))
    return out


def _send(h, pub, outs, msg, timeout=60):
    n = len(outs)
    pub.publish(msg)
    assert wait_for(lambda: len(outs) > n, timeout), "no output for the frame"


def test_clip_stage_labels_detections_and_follows_vocabulary(harness, b32, data_dir):
    from perception2d_ros.models.clip.labeler import ClipLabeler
    from perception2d_ros.models.yolo.detector import YoloDetector

    node = PerceptionNode("pipeline_node", context=harness.context, namespace="/camera",
                          parameter_overrides=[
                              Parameter("stages", value=["detect", "clip"]),
                              Parameter("input", value="rect"),
                              Parameter("clip.model", value=str(b32["exported"]["meta"])),
                              Parameter("clip.allow_outside_models_dir", value=True),
                              Parameter("clip.templates", value=["{}"]),
                              Parameter("vocabulary", value=VOCAB_A)])
    harness.add_node(node)
    assert node.pipeline is not None and node.pipeline.names == ["detect", "clip"]
    dets = harness.subscribe(Detection2DArray, "/camera/detections", RELIABLE)
    frame_labels = harness.subscribe(Classification, "/camera/clip/labels", RELIABLE)
    infos = harness.subscribe(LabelInfo, "/camera/clip/label_info", LATCHED)
    pub = harness.publisher(Image, "/camera/image_rect", BEST_EFFORT)
    assert harness.wait_matched(pub)
    frames = _frames(data_dir, 2)
    _send(harness, pub, dets, frames[0][1])
    assert wait_for(lambda: len(frame_labels) == 1 and len(infos) == 1, 10)
    assert [c.class_name for c in infos[0].class_map] == VOCAB_A
    assert infos[0].header.stamp == frames[0][1].header.stamp

    # the node's labels equal the offline wrapper's on the same frame and boxes
    offline_det = YoloDetector.from_model("yolox_nano", conf=0.3, iou=0.45).detect(frames[0][0])
    lab = ClipLabeler(b32["exported"], CPU, text_cache_dir=None)
    lab.set_vocabulary(VOCAB_A, ["{}"])
    ref = lab.label_boxes(frames[0][0], offline_det.xyxy, top_k=3, padding=0.1)
    out = dets[0]
    assert len(out.detections) == len(ref) > 0
    for d, r, name in zip(out.detections, ref, offline_det.class_names):
        hyps = [(h.hypothesis.class_id, h.hypothesis.score) for h in d.results]
        assert hyps[0][0] == name  # extend mode: the detector's class stays first
        assert [n for n, _ in hyps[1:]] == [x.name for x in r.labels]
        np.testing.assert_allclose([s for _, s in hyps[1:]], [x.score for x in r.labels],
                                   atol=1e-5)
    whole = lab.label_image(frames[0][0], top_k=3)
    assert [r.class_id for r in frame_labels[0].results] == [x.name for x in whole.labels]

    # runtime vocabulary change: LabelInfo first, then outputs computed with it
    res = node.set_parameters([Parameter("vocabulary", value=VOCAB_B)])
    assert res[0].successful
    _send(harness, pub, dets, frames[1][1])
    assert wait_for(lambda: len(infos) == 2 and len(frame_labels) == 2, 10)
    assert [c.class_name for c in infos[1].class_map] == VOCAB_B
    assert infos[1].header.stamp == frames[1][1].header.stamp
    assert {r.class_id for r in frame_labels[1].results} <= set(VOCAB_B)
    for d in dets[1].detections:
        assert {h.hypothesis.class_id for h in d.results[1:]} <= set(VOCAB_B)
    lab.close()


def test_lseg_stage_publishes_label_maps(harness, b32, lseg_small, data_dir):
    from perception2d_ros.models.clip.vocabulary import TextEmbeddingCache
    from perception2d_ros.models.lseg.labeler import LSegSegmenter

    vocab = ["floor", "wall", "person", "car", "sky"]
    node = PerceptionNode("pipeline_node", context=harness.context, namespace="/camera",
                          parameter_overrides=[
                              Parameter("stages", value=["lseg"]),
                              Parameter("input", value="rect"),
                              Parameter("lseg.model", value=str(lseg_small["image"])),
                              Parameter("lseg.allow_outside_models_dir", value=True),
                              Parameter("lseg.text_model",
                                        value=str(b32["exported"]["meta"])),
                              Parameter("lseg.templates", value=["{}"]),
                              Parameter("vocabulary", value=vocab)])
    harness.add_node(node)
    assert node.pipeline is not None, "lseg stage failed to configure"
    labels = harness.subscribe(Image, "/camera/labels", RELIABLE)
    infos = harness.subscribe(LabelInfo, "/camera/labels/label_info", LATCHED)
    pub = harness.publisher(Image, "/camera/image_rect", BEST_EFFORT)
    assert harness.wait_matched(pub)
    img, msg = _frames(data_dir, 1)[0]
    _send(harness, pub, labels, msg)
    assert wait_for(lambda: len(infos) == 1, 10)
    out = labels[0]
    assert (out.width, out.height, out.encoding) == (img.shape[1], img.shape[0], "mono8")
    assert out.header.stamp == msg.header.stamp
    got = np.frombuffer(bytes(out.data), np.uint8).reshape(img.shape[:2])
    assert [(c.class_id, c.class_name) for c in infos[0].class_map] == \
        [(i, v) for i, v in enumerate(vocab)] + [(255, "other")]
    # equal to the offline segmenter with the same text embeddings
    seg = LSegSegmenter.from_onnx(lseg_small["image"], CPU)
    cache = TextEmbeddingCache.from_model(b32["exported"]["meta"], engine_config=CPU)
    ref = seg.segment(img, np.asarray(cache.encode(vocab, ["{}"]), np.float32), labels=vocab)
    np.testing.assert_array_equal(got, ref.label_map.astype(np.uint8))
    assert set(np.unique(got)) <= set(range(len(vocab))) | {255}
    seg.close()


@pytest.mark.slow
def test_sam_stage_masks_every_detection(harness, sam_random_export, data_dir):
    """detect → SAM in one pipeline_node: one encoder run per frame, a mono16 instance-id
    image aligned to the input, masks/detections with mask ids and scores, identical to the
    offline SamSegmenter on the detector's boxes."""
    from perception2d_ros.models.sam.results import instance_id_image
    from perception2d_ros.models.sam.runtime import SamSegmenter
    from perception2d_ros.models.yolo.detector import YoloDetector

    _, files, _ = sam_random_export
    node = PerceptionNode("pipeline_node", context=harness.context, namespace="/camera",
                          parameter_overrides=[
                              Parameter("stages", value=["detect", "sam"]),
                              Parameter("input", value="rect"),
                              Parameter("sam.model", value=str(files["meta"])),
                              Parameter("sam.allow_outside_models_dir", value=True)])
    harness.add_node(node)
    assert node.pipeline is not None and node.pipeline.names == ["detect", "sam"]
    masks = harness.subscribe(Image, "/camera/masks", RELIABLE)
    mdets = harness.subscribe(Detection2DArray, "/camera/masks/detections", RELIABLE)
    pub = harness.publisher(Image, "/camera/image_rect", BEST_EFFORT)
    assert harness.wait_matched(pub)
    img, msg = _frames(data_dir, 1)[0]
    _send(harness, pub, masks, msg, timeout=120)
    assert wait_for(lambda: len(mdets) == 1, 10)
    out = masks[0]
    assert (out.width, out.height, out.encoding) == (img.shape[1], img.shape[0], "mono16")
    assert out.header.stamp == msg.header.stamp
    got = np.frombuffer(bytes(out.data), np.uint16).reshape(img.shape[:2])
    det = YoloDetector.from_model("yolox_nano", conf=0.3, iou=0.45).detect(img)
    seg = SamSegmenter.from_exported(files, CPU)
    seg.set_image(img)
    ref = seg.predict(boxes=det.xyxy)
    np.testing.assert_array_equal(got, instance_id_image(ref))
    assert len(mdets[0].detections) == len(det) > 0
    for i, d in enumerate(mdets[0].detections):
        assert d.id == str(i + 1)
        assert d.results[0].hypothesis.class_id == det.class_names[i]
        assert d.results[-1].hypothesis.class_id == "mask_score"
        assert abs(d.results[-1].hypothesis.score - float(ref.scores[i])) < 1e-5
    sam_stage = next(s for s in node.pipeline.stages if s.name == "sam")
    assert sam_stage.segmenter.encoder_calls == 1  # one encoder run for all boxes


def test_separate_clip_node_matches_pipeline_mode(harness, b32, data_dir, tmp_path):
    """detector_node → clip_node (over topics, exact-stamp pairing) publishes the same labelled
    detections and frame labels as one pipeline_node running detect + clip."""
    import yaml

    from perception2d_ros.ros.bringup import node_list

    params = {"/**": {"ros__parameters": {
        "stages": ["detect", "clip"], "input": "rect",
        "clip.model": str(b32["exported"]["meta"]), "clip.templates": ["{}"],
        "clip.allow_outside_models_dir": True,
        "vocabulary": VOCAB_A}}}
    pfile = tmp_path / "p.yaml"
    pfile.write_text(yaml.safe_dump(params))
    results = {}
    for mode, ns in ((True, "/pipe"), (False, "/sep")):
        for spec in node_list(pipeline=mode, params_file=pfile):
            args = spec.ros_args(ns, False, "warn")
            if spec.kind == "pipeline_node":
                args += ["-p", "input:=rect"]
            harness.add_node(PerceptionNode(spec.kind, context=harness.context, cli_args=args))
        results[ns] = (harness.subscribe(Detection2DArray, f"{ns}/detections", RELIABLE),
                       harness.subscribe(Classification, f"{ns}/clip/labels", RELIABLE))
    pubs = {"/pipe": harness.publisher(Image, "/pipe/image_rect", BEST_EFFORT),
            "/sep": harness.publisher(Image, "/sep/image_raw", BEST_EFFORT)}
    for ns, pub in pubs.items():
        assert harness.wait_matched(pub, n=1 if ns == "/pipe" else 2)
    for _, msg in _frames(data_dir, 2):
        for ns, pub in pubs.items():
            _send(harness, pub, results[ns][1], msg)
    assert wait_for(lambda: all(len(r[0]) == 2 for r in results.values()), 20)
    (pd, pl), (sd, sl) = results["/pipe"], results["/sep"]
    for a, b in zip(pd, sd):
        assert a.header == b.header
        assert len(a.detections) == len(b.detections) > 0
        for da, db in zip(a.detections, b.detections):
            assert [h.hypothesis.class_id for h in da.results] == \
                [h.hypothesis.class_id for h in db.results]
            np.testing.assert_allclose([h.hypothesis.score for h in da.results],
                                       [h.hypothesis.score for h in db.results], atol=1e-4)
    for a, b in zip(pl, sl):
        assert [r.class_id for r in a.results] == [r.class_id for r in b.results]
