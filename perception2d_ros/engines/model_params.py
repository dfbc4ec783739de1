"""Every model parameter follows one rule: a manifest name, or a file inside the models
directory (``models_dir``). A path outside it is refused unless that stage's
``allow_outside_models_dir`` is true, the same switch for ``detect``, ``sam``, ``clip`` and
``lseg``. A node's parameters can come from anyone who can set them; a file path they name
is loaded (a ``.pth``/``.pt`` checkpoint is unpickled), so the default is the directory the
operator controls. The CLI commands (``detect --model FILE``, ``segment --checkpoint FILE``)
are a user naming their own file and are not confined.

:func:`confine_model_params` is called by ``build_pipeline`` (nodes, ``process``, bringup) and
by the CLI's params loading; :func:`check_model_files` is the cheap "is it there" check the
pip-only bringup and ``make demo`` run before starting nodes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

#: stage → its parameters that name a model file (or a manifest name)
MODEL_PARAMS: dict[str, tuple[str, ...]] = {
    "detect": ("model",),
    "sam": ("model", "checkpoint"),
    "clip": ("model", "checkpoint"),
    "lseg": ("model", "checkpoint", "text_model"),
}


def _looks_like_path(text: str, root: Path) -> bool:
    return ("/" in text or text.startswith("~") or Path(text).expanduser().exists()
            or (root / text).exists())


def _resolved(text: str, root: Path) -> Path:
    p = Path(text).expanduser()
    if not p.is_absolute():
        p = root / p if (root / p).exists() else p
    return p.resolve()


def confine_model_params(cfg: dict[str, Any]) -> None:
    """Raise ModelFileError naming the parameter if a model parameter of an enabled stage is
    a path outside the models directory and that stage does not allow it."""
    from perception2d_ros.engines import model_store as ms

    root = ms.models_dir(cfg.get("models_dir") or None)
    try:
        names = set(ms.load_manifest(cfg.get("models_dir") or None))
    except Exception:  # noqa: BLE001 - a broken manifest is reported where it is loaded
        names = set()
    for stage, keys in MODEL_PARAMS.items():
        if stage not in cfg.get("stages", ()):
            continue
        group = cfg.get(stage) or {}
        if group.get("allow_outside_models_dir", False):
            continue
        for key in keys:
            text = str(group.get(key) or "").strip()
            if not text or text in names or not _looks_like_path(text, root):
                continue
            path = _resolved(text, root)
            if path != root and root not in path.parents:
                raise ms.ModelFileError(
                    f"{stage}.{key}: '{text}' is outside the models directory {root}; move "
                    f"it there (or set models_dir), or set {stage}.allow_outside_models_dir: "
                    "true to load it from there")


def check_model_files(cfg: dict[str, Any]) -> None:
    """Cheap check, loading nothing: the model each enabled detect/SAM stage names exists.
    Raises ModelFileError with what to do (the same text the stage would give at configure).
    CLIP and LSeg are left to configure (they also find exports made from the checkpoint)."""
    from perception2d_ros.engines import model_store as ms

    md = cfg.get("models_dir") or None
    for stage in ("detect", "sam"):
        if stage not in cfg.get("stages", ()):
            continue
        group = cfg.get(stage) or {}
        ckpt = str(group.get("checkpoint") or "").strip()
        if ckpt:
            if not Path(ckpt).expanduser().is_file():
                raise ms.ModelFileError(f"{stage}.checkpoint: {ckpt} not found; check the path")
            continue
        name = str(group.get("model") or "").strip()
        manifest = ms.load_manifest(md)
        if name in manifest:
            entry = manifest[name]
            path = ms.entry_path(entry, md)
            if not path.is_file():
                raise ms.ModelFileError(
                    f"{stage}.model: '{name}' is not in the models directory ({path} is "
                    f"missing); {ms.how_to_get(entry, path)}")
        elif name and not _resolved(name, ms.models_dir(md)).exists():
            known = ", ".join(sorted(n for n, e in manifest.items()
                                     if e.kind in ("detector", "sam")
                                     and stage in (e.stages or [])))
            raise ms.ModelFileError(f"{stage}.model: '{name}' is neither a known model "
                                    f"({known}) nor an existing file; `perception2d models list` shows the "
                                    "models")


def check_engine_params(cfg: dict[str, Any]) -> None:
    """Raise ValueError naming the parameter for a ``*.backend`` / ``*.device`` /
    ``*.precision`` of an enabled stage that no engine accepts (checked before any model
    loads, so the message names the parameter rather than the engine)."""
    from perception2d_ros.engines.base import BACKEND_CHOICES

    allowed = {"backend": BACKEND_CHOICES, "device": ("auto", "cpu", "cuda"),
               "precision": ("fp32", "fp16", "int8")}
    for stage in MODEL_PARAMS:
        if stage not in cfg.get("stages", ()):
            continue
        group = cfg.get(stage) or {}
        for key, values in allowed.items():
            if key in group and str(group[key]) not in values:
                raise ValueError(f"{stage}.{key}: '{group[key]}' is not one of "
                                 f"{', '.join(values)}")
