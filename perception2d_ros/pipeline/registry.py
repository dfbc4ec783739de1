"""The pipeline's stages by name: each stage's config defaults and its factory, as plain
functions whose imports stay inside them (importing pipeline/ loads no model, nor torch).
:func:`perception2d_ros.pipeline.build.build_pipeline` makes the stages through :data:`STAGES`;
:func:`perception2d_ros.pipeline.config.merge_config` takes their defaults from it."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

LOG = logging.getLogger("perception2d.pipeline")


@dataclass
class BuildContext:
    """What :func:`~perception2d_ros.pipeline.build.build_pipeline` decided before it makes
    the stages: the loaded detector (its device decides where frames live) and the device
    the frames stay on (engines.device.DeviceFrames, None = the host)."""

    detector: Any = None
    device_frames: Any = None
    log: Callable[[str], None] = LOG.info


@dataclass(frozen=True)
class StageEntry:
    """``defaults()``: the stage's parameter group (None: it has none, only top-level keys);
    ``build(cfg, ctx)``: the stage object for a merged, validated config."""

    defaults: Callable[[], dict[str, Any] | None]
    build: Callable[[dict[str, Any], BuildContext], Any]


def _no_defaults() -> None:
    return None


def _build_rectify(cfg: dict[str, Any], ctx: BuildContext) -> Any:
    from perception2d_ros.pipeline.rectify import INTERPOLATIONS, RectifyStage

    return RectifyStage(INTERPOLATIONS[cfg["interpolation"]], cfg["output_encoding"],
                        device_frames=ctx.device_frames)


def _detect_defaults() -> dict[str, Any]:
    from perception2d_ros.models.yolo.stage import DEFAULTS

    return dict(DEFAULTS)


def _build_detect(cfg: dict[str, Any], ctx: BuildContext) -> Any:
    from perception2d_ros.models.yolo.stage import build_stage

    return build_stage(cfg, detector=ctx.detector, device_frames=ctx.device_frames,
                       log=ctx.log)


# The families whose stage module offers ``DEFAULTS`` and ``build_stage(cfg)``: one loader
# each (the import stays inside it), one entry made from it.
def _track() -> Any:
    from perception2d_ros.models.tracking import stage

    return stage


def _sam() -> Any:
    from perception2d_ros.models.sam import stage

    return stage


def _clip() -> Any:
    from perception2d_ros.models.clip import stage

    return stage


def _lseg() -> Any:
    from perception2d_ros.models.lseg import stage

    return stage


def _family(load: Callable[[], Any]) -> StageEntry:
    return StageEntry(lambda: dict(load().DEFAULTS), lambda cfg, ctx: load().build_stage(cfg))


#: stage name → entry, in the order the stages run (rectify → detect → track → SAM → CLIP
#: → LSeg)
STAGES: dict[str, StageEntry] = {
    "rectify": StageEntry(_no_defaults, _build_rectify),
    "detect": StageEntry(_detect_defaults, _build_detect),
    "track": _family(_track),
    "sam": _family(_sam),
    "clip": _family(_clip),
    "lseg": _family(_lseg),
}
