"""ROS-free perception pipeline: stages that run on one in-memory frame.

A :class:`~perception2d_ros.pipeline.frame.Frame` carries the image (as received, converted
once to a numpy array), its stamp and frame id, the camera model, and every stage's results.
Stages (rectify → detect → SAM → CLIP → LSeg, with ``track`` after detect) mutate the frame in
place and record their time in ``frame.timings``. The ROS nodes, the offline ``perception2d
process`` tool and the benchmarks all run these same stage objects, so separate-node mode,
pipeline mode and offline mode produce identical results.

Here: :class:`Pipeline` (the ordered stages) and :func:`build_pipeline` (config → stages:
the detector first, then where frames live, then every stage through the registry).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

from perception2d_ros.pipeline.config import STAGE_ORDER, validate_config
from perception2d_ros.pipeline.frame import Frame, Stage
from perception2d_ros.pipeline.registry import STAGES, BuildContext

LOG = logging.getLogger("perception2d.pipeline")


class Pipeline:
    """An ordered list of stages run on each frame. A stage that raises leaves the frame's
    later results unset; the error propagates to the caller (nodes log it, throttled)."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        names = [s.name for s in stages]
        order = [n for n in STAGE_ORDER if n in names]
        if names != order:
            raise ValueError(f"stages must run in the order {STAGE_ORDER}; got {names}")
        self.stages = list(stages)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def run(self, frame: Frame, on_stage: Callable[[str, Frame], None] | None = None) -> Frame:
        t0 = time.perf_counter()
        for stage in self.stages:
            stage.process(frame)
            if on_stage is not None:
                on_stage(stage.name, frame)
        frame.timings["total"] = time.perf_counter() - t0
        return frame


def build_pipeline(cfg: dict[str, Any], log: Callable[[str], None] = LOG.info) -> Pipeline:
    """Create the stage objects (loading models) for a merged, validated config.

    The detector is loaded first: the device it runs on decides (``detect.device_frames``)
    whether frames stay there, and the rectify and detect stages are made for that device."""
    from perception2d_ros.engines.model_params import check_engine_params, confine_model_params

    validate_config(cfg)
    check_engine_params(cfg)
    confine_model_params(cfg)  # every model parameter: inside models_dir unless allowed
    ctx = BuildContext(log=log)
    if "detect" in cfg["stages"]:
        from perception2d_ros.models.yolo.stage import load_detector

        ctx.detector = load_detector(cfg, log)
    ctx.device_frames = device_frames_for(ctx.detector,
                                          str(cfg["detect"].get("device_frames", "auto")), log)
    stages = [STAGES[name].build(cfg, ctx) for name in STAGE_ORDER if name in cfg["stages"]]
    if ctx.device_frames is not None:
        from perception2d_ros.engines.device import torch_device_of

        device = torch_device_of(ctx.detector.engine)
        sam = next((s for s in stages if s.name == "sam"), None)
        if sam is not None and getattr(sam.segmenter, "device", None) != device:
            sam = None
        log(f"frames stay on {device}: rectify, letterbox, decode + NMS"
            + (", SAM pre/postprocessing" if sam is not None else ""))
    return Pipeline(stages)


def device_frames_for(detector: Any, mode: str, log: Callable[[str], None]) -> Any:
    """``detect.device_frames``: where the detector runs on a torch device (auto: a CUDA
    one), rectify and detect work on a device copy of the frame (``frame.device_bgr``) and a
    SAM stage on the same device encodes it without a host round trip. Returns the
    engines.device.DeviceFrames of that device, or None (frames stay on the host)."""
    from perception2d_ros.engines.device import torch_device_of

    device = torch_device_of(detector.engine) if detector is not None else None
    if mode == "auto" and device is None and detector is not None and \
            str(getattr(detector.engine, "device", "")).startswith("cuda"):
        # a GPU detector that is not torch (TensorRT, ONNX Runtime CUDA): say why frames
        # stay on the host instead of switching device_frames off silently
        log(f"detect.device_frames auto: off, the detector runs on "
            f"{getattr(detector.engine, 'backend', '?')} (frames stay on the device only "
            "with detect.backend: torch)")
        return None
    if mode == "off" or (mode == "auto" and not (device or "").startswith("cuda")):
        return None
    if device is None:
        raise ValueError("detect.device_frames: on needs the detector on the torch backend "
                         "(detect.backend: torch)")
    from perception2d_ros.engines.device import DeviceFrames

    return DeviceFrames(device)
