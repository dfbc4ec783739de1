"""CLIP checkpoints → open_clip models (eval, fp32, CPU): safe checkpoint reading, model
building, the sidecar facts of a model, and seeded test checkpoints in the official formats.
Torch and open_clip are imported inside the functions: only export (:mod:`.export`) and the
parity check (:mod:`.parity`) need them.

Checkpoints (``load_clip``) — never executes pickled code:

* OpenAI release ``.pt`` (a TorchScript archive): read by :func:`read_state_dict` with a
  restricted unpickler that only rebuilds tensors and records module attributes
  (``__torch__.*`` classes become inert records; any other global is refused). Neither
  ``torch.jit.load`` nor ``torch.load(weights_only=False)`` is used. OpenAI weights use
  QuickGELU: selected automatically for TorchScript archives (or with an ``-quickgelu`` arch
  name / ``quick_gelu=True``).
* ``torch.save`` state dicts (``.pt``/``.pth``/``.bin``; OpenAI or open_clip key names,
  optional ``state_dict`` wrapper / ``module.`` prefix): ``torch.load(weights_only=True)``.
* ``.safetensors`` (``safetensors.torch.load_file``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Mapping

LOG = logging.getLogger("perception2d.clip")

TESTED_ARCHS = ("ViT-B-32", "ViT-B-16")
_ALIASES = {"ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14",
            "ViT-L/14@336px": "ViT-L-14-336"}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read safely or does not fit the architecture."""


# --------------------------------------------------------------------------- names
def canonical_arch(arch: str) -> str:
    """open_clip model name for ``arch`` ("ViT-B/32" → "ViT-B-32")."""
    return _ALIASES.get(arch, arch)


# --------------------------------------------------------------------------- checkpoint reading
def read_state_dict(path: str | Path) -> dict[str, Any]:
    """State dict (name → torch.Tensor) of a CLIP checkpoint without executing pickled code."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    suffix = p.suffix.lower()
    if suffix in (".npz", ".npy"):
        raise CheckpointError(f"{p}: numpy (big_vision/SigLIP) checkpoints are not supported")
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(p), device="cpu")
    elif zipfile.is_zipfile(p) and _is_torchscript(p):
        sd = _read_torchscript_tensors(p)
    else:
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{p}: refused to load (it needs arbitrary pickled code, which is never "
                f"executed here): {str(exc).splitlines()[0]}") from exc
        except Exception as exc:  # torch raises RuntimeError / EOFError on bad files
            raise CheckpointError(f"{p}: not a readable torch checkpoint: {exc}") from exc
    return _unwrap_state_dict(sd, p)


def _unwrap_state_dict(obj: Any, p: Path) -> dict[str, Any]:
    import torch

    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{p}: no state dict found (got {type(obj).__name__})")
    out = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise CheckpointError(f"{p}: the checkpoint holds no tensors")
    if all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


def _is_torchscript(p: Path) -> bool:
    with zipfile.ZipFile(p) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


_STORAGE_DTYPES = {
    "FloatStorage": "float32", "HalfStorage": "float16", "DoubleStorage": "float64",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


class _ScriptRecord:
    """Inert stand-in for a TorchScript object (``__torch__.*``): keeps its attribute dict."""

    __slots__ = ("state",)

    def __init__(self, *args: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _StorageType:
    __slots__ = ("dtype",)

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


def _read_torchscript_tensors(p: Path) -> dict[str, Any]:
    """All tensors of a TorchScript archive's ``data.pkl`` by attribute path, read with an
    unpickler that can only build tensors, lists, dicts and inert records."""
    import torch

    with zipfile.ZipFile(p) as z:
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl:
            raise CheckpointError(f"{p}: TorchScript archive without data.pkl")
        prefix = pkl[0][: -len("data.pkl")]
        storages: dict[str, Any] = {}

        def rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any, *_: Any) -> Any:
            return torch.as_strided(storage, tuple(size), tuple(stride), int(offset)).clone()

        def identity(x: Any, *_: Any) -> Any:
            return x

        allowed = {
            ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
            ("torch._utils", "_rebuild_tensor"): rebuild_tensor,
            ("collections", "OrderedDict"): OrderedDict,
            ("torch.jit._pickle", "build_intlist"): identity,
            ("torch.jit._pickle", "build_doublelist"): identity,
            ("torch.jit._pickle", "build_boollist"): identity,
            ("torch.jit._pickle", "build_tensorlist"): identity,
            ("torch.jit._pickle", "build_genericlist"): identity,
            ("torch.jit._pickle", "restore_type_tag"): identity,
        }

        class Restricted(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                if (module, name) in allowed:
                    return allowed[(module, name)]
                if module == "torch" and name in _STORAGE_DTYPES:
                    return _StorageType(_STORAGE_DTYPES[name])
                if module.startswith("__torch__"):
                    return type(name, (_ScriptRecord,), {"__slots__": ()})
                raise pickle.UnpicklingError(
                    f"refusing global '{module}.{name}' in TorchScript archive {p.name}")

            def persistent_load(self, pid: Any) -> Any:
                if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
                    raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
                stype, key = pid[1], str(pid[2])
                if not isinstance(stype, _StorageType) or not re.fullmatch(r"\w+", key):
                    raise pickle.UnpicklingError(f"bad storage reference {pid!r}")
                if key not in storages:
                    data = bytearray(z.read(f"{prefix}data/{key}"))
                    dtype = getattr(torch, stype.dtype)
                    storages[key] = (torch.frombuffer(data, dtype=dtype) if data
                                     else torch.empty(0, dtype=dtype))
                return storages[key]

        import io

        try:
            root = Restricted(io.BytesIO(z.read(pkl[0]))).load()
        except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as exc:
            raise CheckpointError(f"{p}: cannot read TorchScript archive safely: {exc}") from exc

    out: dict[str, Any] = {}

    def walk(obj: Any, prefix_: str, depth: int) -> None:
        if depth > 64:
            raise CheckpointError(f"{p}: module tree too deep")
        if isinstance(obj, torch.Tensor):
            out[prefix_.rstrip(".")] = obj
        elif isinstance(obj, _ScriptRecord):
            walk(obj.state, prefix_, depth + 1)
        elif isinstance(obj, Mapping):
            for k, v in obj.items():
                if isinstance(k, str):
                    walk(v, f"{prefix_}{k}.", depth + 1)

    walk(root, "", 0)
    return out


# --------------------------------------------------------------------------- model building
def _quick_gelu_default(arch: str, checkpoint: Path | None) -> bool:
    if canonical_arch(arch).endswith("-quickgelu"):
        return True
    if checkpoint is None:
        return False
    if zipfile.is_zipfile(checkpoint) and _is_torchscript(checkpoint):
        return True  # OpenAI's release archives; their weights were trained with QuickGELU
    cfg = checkpoint.parent / "open_clip_config.json"  # HF-hub layout
    if cfg.is_file():
        try:
            model_cfg = json.loads(cfg.read_text()).get("model_cfg", {})
            return bool(model_cfg.get("quick_gelu", False))
        except (OSError, ValueError):
            return False
    return False


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    import torch

    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def _check_arch(arch: str) -> str:
    import open_clip

    name = canonical_arch(arch)
    if name not in open_clip.list_models():
        raise ValueError(f"unknown CLIP architecture '{arch}'; tested: {', '.join(TESTED_ARCHS)}")
    cfg = open_clip.get_model_config(name) or {}
    text = cfg.get("text_cfg", {})
    if text.get("hf_tokenizer_name") or text.get("hf_model_name") or \
            text.get("vocab_size", 49408) != 49408 or text.get("context_length", 77) != 77 or \
            cfg.get("custom_text") or "timm_model_name" in cfg.get("vision_cfg", {}):
        raise ValueError(f"'{name}' is not an OpenAI-style CLIP (CLIP BPE text tower, 77 "
                         f"tokens); tested: {', '.join(TESTED_ARCHS)}")
    if name.replace("-quickgelu", "") not in TESTED_ARCHS:
        LOG.warning("CLIP architecture %s is not covered by the parity tests (tested: %s)",
                    name, ", ".join(TESTED_ARCHS))
    return name


def load_clip(arch: str, checkpoint: str | Path | None = None, seed: int | None = None, *,
              quick_gelu: bool | None = None) -> Any:
    """open_clip ``CLIP`` model (eval, fp32, CPU) with the weights of ``checkpoint``.

    ``checkpoint=None`` gives seeded random weights (tests / smoke checks only; ``seed``
    required). ``quick_gelu=None`` picks the activation from the checkpoint (see module doc).
    """
    import open_clip
    import torch

    name = _check_arch(arch)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is None and seed is None:
        raise ValueError("load_clip: give a checkpoint, or a seed for random weights")
    if quick_gelu is None:
        quick_gelu = _quick_gelu_default(name, ckpt)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns "no pretrained weights" on every build
    try:
        with _seeded(seed):
            model = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)
    finally:
        root.setLevel(level)
    if ckpt is not None:
        sd = read_state_dict(ckpt)
        _load_weights(model, sd, ckpt)
    model = model.float().eval()
    model.requires_grad_(False)
    model._p2d_quick_gelu = bool(quick_gelu)  # type: ignore[attr-defined]
    return model


def _load_weights(model: Any, sd: dict[str, Any], ckpt: Path) -> None:
    import torch
    from open_clip.model import resize_pos_embed

    target = model.state_dict()
    sd = {k: v for k, v in sd.items()
          if k not in ("input_resolution", "context_length", "vocab_size")}
    if "positional_embedding" in sd and "text.positional_embedding" in target:
        from open_clip.model import convert_to_custom_text_state_dict

        sd = convert_to_custom_text_state_dict(sd)
    if "logit_scale" in sd and sd["logit_scale"].ndim != target["logit_scale"].ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(target["logit_scale"].shape)
    resize_pos_embed(sd, model)
    missing = [k for k in target if k not in sd]
    extra = [k for k in sd if k not in target]
    if missing:
        raise CheckpointError(
            f"{ckpt}: does not fit {type(model).__name__} of this architecture — "
            f"{len(missing)} weights missing (e.g. {missing[:3]}); wrong --arch?")
    bad = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in target.items()
           if tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"{ckpt}: shape mismatch for {len(bad)} weights, e.g. "
                              f"{bad[0][0]} {bad[0][1]} vs model {bad[0][2]}; wrong --arch?")
    if extra:
        LOG.debug("ignoring %d non-weight tensors of %s: %s", len(extra), ckpt, extra[:5])
    with torch.no_grad():
        model.load_state_dict({k: sd[k].float() if sd[k].is_floating_point() else sd[k]
                               for k in target}, strict=True)


def model_info(model: Any) -> dict[str, Any]:
    """Preprocessing + head facts of an open_clip model (goes into the sidecar)."""
    import torch

    from perception2d_ros.models.clip.preprocess import OPENAI_MEAN, OPENAI_STD

    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    with torch.no_grad():
        scale = float(model.logit_scale.exp().item())
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    return {
        "image_size": size,
        "mean": [float(m) for m in pp.get("mean", OPENAI_MEAN)],
        "std": [float(s) for s in pp.get("std", OPENAI_STD)],
        "interpolation": pp.get("interpolation", "bicubic"),
        "resize_mode": pp.get("resize_mode", "shortest"),
        "logit_scale": scale,
        "embed_dim": int(model.text_projection.shape[1]
                         if not hasattr(model.text_projection, "out_features")
                         else model.text_projection.out_features),
        "context_length": int(model.context_length),
        "vocab_size": int(model.vocab_size),
        "quick_gelu": bool(getattr(model, "_p2d_quick_gelu", False)),
    }


# --------------------------------------------------------------------------- test checkpoints
CHECKPOINT_FORMATS = ("openai-torchscript", "openai-state-dict", "open_clip", "bin",
                      "safetensors")


def make_test_checkpoint(arch: str, path: str | Path, *, seed: int = 0,
                         fmt: str = "openai-torchscript", logit_scale: float | None = 100.0,
                         quick_gelu: bool | None = None, half: bool | None = None) -> Path:
    """Write seeded random weights of ``arch`` as a checkpoint in an official format (for
    tests and smoke checks; no pretrained weights are ever downloaded).

    ``openai-torchscript``: a ``torch.jit.script`` archive with fp16 weights and QuickGELU, as
    OpenAI's ``ViT-B-32.pt`` release files; ``openai-state-dict``: their fp16 state dict saved
    with ``torch.save``; ``open_clip``: a training checkpoint ``{"epoch", "state_dict"}`` with
    ``module.`` prefixes; ``bin``: a plain ``torch.save`` state dict (HF hub
    ``open_clip_pytorch_model.bin``); ``safetensors``. ``logit_scale`` sets the multiplier
    (trained CLIP models sit at the 100 clamp; random init is 1/0.07). ``half``: store fp16
    weights (default: the OpenAI formats only, as released)."""
    import math

    import torch

    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"fmt must be one of {CHECKPOINT_FORMATS}")
    if quick_gelu is None:
        quick_gelu = fmt.startswith("openai")
    model = load_clip(arch, None, seed=seed, quick_gelu=quick_gelu)
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(logit_scale))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if fmt.startswith("openai"):
        from open_clip.model import convert_weights_to_lp

        convert_weights_to_lp(model, torch.float16)  # OpenAI releases are fp16
    elif half:
        model.half()
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if fmt == "openai-torchscript":
        import warnings

        # OpenAI's archives hold the causal mask as a plain attribute, not in the state dict
        mask = model._buffers.pop("attn_mask")
        model.attn_mask = mask
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(model).save(str(p))
    elif fmt == "openai-state-dict" or fmt == "bin":
        torch.save(sd, p)
    elif fmt == "open_clip":
        torch.save({"epoch": 1, "name": "test",
                    "state_dict": {f"module.{k}": v for k, v in sd.items()}}, p)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(p))
    return p
