"""Segment Anything (SAM) runtime: preprocessing, batched prompting, postprocessing.

ROS-free and torch-free: the image encoder and the prompt decoder run as ONNX models through
:mod:`perception2d_ros.engines.factory` (ONNX Runtime or TensorRT). The ONNX files come from
:func:`perception2d_ros.models.sam.export.export_onnx` (official segment-anything ViT-B/L/H or
MobileSAM ``vit_t`` checkpoints, loaded weights-only). MobileSAM only swaps the image encoder
(TinyViT, same [1,256,64,64] embedding): prompts, decoder and postprocessing are SAM's.

Usage follows ``segment_anything.SamPredictor``: encode once, prompt many times::

    seg = SamSegmenter.from_exported(export_dir)
    seg.set_image(image_bgr, frame_id=42)        # one encoder run, embedding cached
    res = seg.predict(boxes=[[10, 20, 200, 300]])   # one decoder run for all prompts
    ids = instance_id_image(res)                  # uint16 HxW, 0 = background

Coordinates are pixels of the original image, x right, y down; boxes are ``xyxy`` in the
same pixel-edge convention as segment-anything (no +1). Every stage of the pipeline matches
segment-anything's: :class:`ResizeLongestSide` reproduces its PIL bilinear resize bit for bit,
normalisation and bottom-right zero padding are its ``Sam.preprocess``, prompts are embedded
exactly as its ``PromptEncoder`` does (boxes = two corner points with labels 2 and 3; a point
prompt without a box gets one padding point with label -1), masks are upscaled as its
``Sam.postprocess_masks`` and thresholded at ``mask_threshold`` (0.0 logits), stability is its
``calculate_stability_score``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from perception2d_ros.engines.base import Engine

from perception2d_ros.engines.factory import EngineConfig, create_engine
from perception2d_ros.models.sam.prompts import _pad_prompts, build_prompts
from perception2d_ros.models.sam.results import SamResult, stability_score
from perception2d_ros.models.sam.spec import (EMBED_DIM, EMBED_SIZE, ENCODER_INPUT, ENCODER_OUTPUT,
                                              IMAGE_SIZE, LOW_RES, MASK_THRESHOLD, PIXEL_MEAN,
                                              PIXEL_STD, STABILITY_OFFSET, SamError,
                                              SamModelFiles)
from perception2d_ros.models.sam.transforms import ResizeLongestSide

LOG = logging.getLogger("perception2d.sam")


def _decoder_profiles(max_prompts: int, max_points: int) -> dict[str, list[list[int]]]:
    opt_n, opt_p = min(8, max_prompts), min(3, max_points)
    return {
        "point_coords": [[1, 1, 2], [opt_n, opt_p, 2], [max_prompts, max_points, 2]],
        "point_labels": [[1, 1], [opt_n, opt_p], [max_prompts, max_points]],
        "mask_input": [[1, 1, LOW_RES, LOW_RES], [opt_n, 1, LOW_RES, LOW_RES],
                       [max_prompts, 1, LOW_RES, LOW_RES]],
        "has_mask_input": [[1], [opt_n], [max_prompts]],
    }


class SamSegmenter:
    """SAM with a cached image embedding: :meth:`set_image` (one encoder run per frame)
    then :meth:`predict` (one decoder run per ``max_batch`` prompts).

    ``select`` picks the mask among the K = 3 multimask candidates: ``"iou"`` (highest
    predicted IoU, segment-anything's usual choice) or ``"stability"`` (highest stability
    score). ``encoder_calls`` / ``decoder_calls`` count engine runs.
    """

    def __init__(self, encoder: Engine, decoder: Engine, decoder_single: Engine | None = None,
                 *, image_size: int = IMAGE_SIZE, pixel_mean: Sequence[float] = PIXEL_MEAN,
                 pixel_std: Sequence[float] = PIXEL_STD, select: str = "iou",
                 mask_threshold: float = MASK_THRESHOLD,
                 stability_offset: float = STABILITY_OFFSET, max_batch: int = 32,
                 meta: Mapping[str, Any] | None = None,
                 device_tensors: bool | None = None) -> None:
        if select not in ("iou", "stability"):
            raise ValueError(f"select must be 'iou' or 'stability', got '{select}'")
        self.encoder = encoder
        self.decoder = decoder
        self.decoder_single = decoder_single
        self.transform = ResizeLongestSide(image_size, pixel_mean, pixel_std)
        self.select = select
        self.mask_threshold = float(mask_threshold)
        self.stability_offset = float(stability_offset)
        self.max_batch = int(max_batch)
        self.meta = dict(meta or {})
        self.encoder_calls = 0
        self.decoder_calls = 0
        self.last_timings: dict[str, float] = {}
        # torch engines on one device: the image, the embedding and the mask upscaling stay
        # on it (engines/device.py); auto = on for CUDA, where the host round trips cost most
        from perception2d_ros.engines.device import torch_device_of

        devs = {torch_device_of(e) for e in (encoder, decoder, decoder_single) if e is not None}
        dev = devs.pop() if len(devs) == 1 else None
        if device_tensors and dev is None:
            raise SamError("device_tensors needs the encoder and decoders on one torch device")
        self.device = dev if (device_tensors or (device_tensors is None and dev is not None
                                                 and dev.startswith("cuda"))) else None
        self.reset_image()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_exported(cls, where: str | Path | Mapping[str, Any] | SamModelFiles,
                      config: EngineConfig | None = None, *, max_points: int = 16,
                      **kwargs: Any) -> "SamSegmenter":
        """Engines for an export (directory, ``sam.json`` or ``export_onnx``'s dict).
        ``config`` applies to both engines; TensorRT gets decoder shape profiles up to
        ``max_batch`` prompts of ``max_points`` points."""
        files = where if isinstance(where, SamModelFiles) else SamModelFiles.load(where)
        cfg = config or EngineConfig()
        max_batch = int(kwargs.get("max_batch", 32))
        enc = create_engine(files.encoder, replace(cfg, profiles={}))
        dcfg = replace(cfg, profiles=_decoder_profiles(max_batch, max_points))
        dec = create_engine(files.decoder, dcfg)
        single = create_engine(files.decoder_single, dcfg) if files.decoder_single else None
        meta = files.meta
        return cls(enc, dec, single, image_size=int(meta.get("image_size", IMAGE_SIZE)),
                   pixel_mean=meta.get("pixel_mean", PIXEL_MEAN),
                   pixel_std=meta.get("pixel_std", PIXEL_STD), meta=meta, **kwargs)

    def close(self) -> None:
        for e in (self.encoder, self.decoder, self.decoder_single):
            if e is not None:
                e.close()

    # ----------------------------------------------------------------- image
    def reset_image(self) -> None:
        self.embedding: np.ndarray | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self.frame_id: Any = None

    @property
    def is_image_set(self) -> bool:
        return self.embedding is not None

    def preprocess(self, image: np.ndarray, image_format: str = "BGR") -> np.ndarray:
        """HxWx3 uint8 image → encoder input float32 [1,3,1024,1024]."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise SamError(f"expected an HxWx3 uint8 image, got {image.shape} {image.dtype}")
        if image_format not in ("BGR", "RGB"):
            raise ValueError("image_format must be 'BGR' or 'RGB'")
        rgb = image[:, :, ::-1] if image_format == "BGR" else image
        return self.transform.preprocess(np.ascontiguousarray(rgb))

    def set_image(self, image: np.ndarray, frame_id: Any = None,
                  image_format: str = "BGR") -> bool:
        """Encode ``image`` (HxWx3 uint8, BGR by default) and cache the embedding.

        With a ``frame_id`` equal to the cached one (and the same image size) the cached
        embedding is reused and the encoder does not run. Returns True if it ran."""
        on_device = self.device is not None and not isinstance(image, np.ndarray)
        if not on_device:
            image = np.asarray(image)
        size = (int(image.shape[0]), int(image.shape[1]))
        if (frame_id is not None and self.is_image_set and frame_id == self.frame_id
                and size == self.original_size):
            return False
        t0 = time.perf_counter()
        if self.device is not None:
            from perception2d_ros.models.sam.device import sam_preprocess

            if not on_device:
                import torch

                if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                    raise SamError(f"expected an HxWx3 uint8 image, got {image.shape} "
                                   f"{image.dtype}")
                image = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
            tensor = sam_preprocess(image, self.transform, image_format)
            t1 = time.perf_counter()
            out = self.encoder.infer_tensors({ENCODER_INPUT: tensor})
        else:
            tensor = self.preprocess(image, image_format)
            t1 = time.perf_counter()
            out = self.encoder.infer({ENCODER_INPUT: tensor})
        self.encoder_calls += 1
        emb = out[ENCODER_OUTPUT] if ENCODER_OUTPUT in out else next(iter(out.values()))
        self.set_embedding(emb, size, frame_id)
        self.last_timings = {"preprocess_s": t1 - t0, "encoder_s": time.perf_counter() - t1}
        return True

    def set_embedding(self, embedding: np.ndarray, original_size: tuple[int, int],
                      frame_id: Any = None) -> None:
        """Use a precomputed embedding [1,256,64,64] float32 of an image of ``original_size``
        (H, W) — e.g. from another process or the reference model. On the device path the
        embedding is kept as a device tensor (a copy: engine outputs are reused buffers)."""
        if self.device is not None:
            import torch

            emb = (embedding.detach().clone() if isinstance(embedding, torch.Tensor)
                   else torch.from_numpy(np.array(embedding, np.float32))).to(self.device)
        else:
            emb = np.ascontiguousarray(embedding, dtype=np.float32)
        if tuple(emb.shape) != (1, EMBED_DIM, EMBED_SIZE, EMBED_SIZE):
            raise SamError(f"image embedding must be [1,{EMBED_DIM},{EMBED_SIZE},{EMBED_SIZE}], "
                           f"got {emb.shape}")
        self.embedding = emb
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = self.transform.input_size(self.original_size)
        self.frame_id = frame_id

    # ----------------------------------------------------------------- prompts
    def predict(self, boxes: Any = None, points: Any = None, point_labels: Any = None,
                multimask: bool = True, mask_input: np.ndarray | None = None,
                frame_id: Any = None) -> SamResult:
        """Masks for N prompts on the current image (see :func:`build_prompts` for the
        prompt layout). All prompts go through one decoder run (chunks of ``max_batch``).

        mask_input  optional [N,256,256] or [N,1,256,256] float32 low-res logits from a
                    previous result (per prompt; NaN-free); absent → no mask prompt.
        frame_id    if given, must equal the frame id of the cached embedding.
        Returns a :class:`SamResult` with K = 3 candidates when ``multimask`` else 1."""
        if not self.is_image_set:
            raise SamError("no image set: call set_image() before predict()")
        if frame_id is not None and frame_id != self.frame_id:
            raise SamError(f"prompts are for frame {frame_id!r} but the cached embedding is "
                           f"of frame {self.frame_id!r}")
        assert self.original_size is not None
        coords, labels = build_prompts(boxes, points, point_labels)
        n = coords.shape[0]
        h, w = self.original_size
        k = 3 if multimask else 1
        if n == 0:
            return SamResult(np.zeros((0, h, w), bool), np.zeros(0, np.float32),
                             np.zeros(0, np.float32), np.zeros(0, np.int64),
                             np.zeros((0, k, LOW_RES, LOW_RES), np.float32),
                             np.zeros((0, k), np.float32), (h, w), self.frame_id)
        coords = self.transform.apply_coords(coords, self.original_size).astype(np.float32)
        if mask_input is None:
            masks_in = np.zeros((n, 1, LOW_RES, LOW_RES), np.float32)
            has_mask = np.zeros((n,), np.float32)
        else:
            masks_in = np.asarray(mask_input, np.float32).reshape(n, 1, LOW_RES, LOW_RES)
            has_mask = np.ones((n,), np.float32)
        decoder = self.decoder if multimask else self.decoder_single
        if decoder is None:
            raise SamError("this export has no single-mask decoder; use multimask=True")
        t0 = time.perf_counter()
        if self.device is not None:
            return self._predict_device(decoder, coords, labels, masks_in, has_mask)
        lows, ious = [], []
        for s in range(0, n, self.max_batch):
            e = slice(s, s + self.max_batch)
            out = decoder.infer({
                "image_embeddings": self.embedding,
                "point_coords": np.ascontiguousarray(coords[e]),
                "point_labels": np.ascontiguousarray(labels[e]),
                "mask_input": np.ascontiguousarray(masks_in[e]),
                "has_mask_input": np.ascontiguousarray(has_mask[e]),
            })
            self.decoder_calls += 1
            lows.append(np.asarray(out["low_res_masks"], np.float32))
            ious.append(np.asarray(out["iou_predictions"], np.float32))
        low = np.concatenate(lows)
        iou = np.concatenate(ious)
        t1 = time.perf_counter()
        result = self.postprocess(low, iou)
        result.timings = {"decoder_s": t1 - t0, "postprocess_s": time.perf_counter() - t1}
        return result

    def _predict_device(self, decoder: Engine, coords: np.ndarray, labels: np.ndarray,
                        masks_in: np.ndarray, has_mask: np.ndarray) -> SamResult:
        """:meth:`predict` with the embedding, the decoder outputs and the mask upscaling on
        the device; only the final masks and the small arrays come back."""
        import torch

        from perception2d_ros.models.sam.device import sam_postprocess

        assert self.original_size is not None
        t0 = time.perf_counter()
        lows, ious = [], []
        for s in range(0, coords.shape[0], self.max_batch):
            e = slice(s, s + self.max_batch)
            feeds = _pad_prompts(coords[e], labels[e], masks_in[e], has_mask[e])
            m = min(coords.shape[0] - s, self.max_batch)
            out = decoder.infer_tensors({"image_embeddings": self.embedding, **feeds})
            self.decoder_calls += 1
            # copies (outputs are reused buffers), without the padding prompts
            lows.append(out["low_res_masks"][:m].float())
            ious.append(out["iou_predictions"][:m].float())
        low, iou = torch.cat(lows), torch.cat(ious)
        t1 = time.perf_counter()
        masks, scores, stab, chosen = sam_postprocess(
            low, iou, self.transform, self.original_size, self.select, self.mask_threshold,
            self.stability_offset)
        result = SamResult(masks=masks.cpu().numpy(), scores=scores.astype(np.float32),
                           stability=stab.astype(np.float32), chosen=chosen,
                           low_res_logits=low.cpu().numpy(), iou_predictions=iou.cpu().numpy(),
                           image_size=self.original_size, frame_id=self.frame_id)
        result.timings = {"decoder_s": t1 - t0, "postprocess_s": time.perf_counter() - t1}
        result.device_masks = masks   # the same masks on the device (engines.device.combine_masks)
        return result

    def postprocess(self, low_res: np.ndarray, iou_predictions: np.ndarray) -> SamResult:
        """Decoder outputs → :class:`SamResult` for the current image: pick one candidate
        per prompt (``select``), upscale it to the original size, threshold, stability."""
        assert self.original_size is not None
        n, k = low_res.shape[:2]
        idx = np.arange(n)
        if self.select == "stability" and k > 1:
            logits = self.transform.postprocess_masks(low_res, self.original_size)
            stab_all = stability_score(logits, self.mask_threshold, self.stability_offset)
            chosen = np.argmax(np.nan_to_num(stab_all, nan=-1.0), axis=1)
            logits = logits[idx, chosen]
            stab = stab_all[idx, chosen]
        else:
            chosen = np.argmax(iou_predictions, axis=1) if k > 1 else np.zeros(n, np.int64)
            logits = self.transform.postprocess_masks(low_res[idx, chosen][:, None],
                                                      self.original_size)[:, 0]
            stab = stability_score(logits, self.mask_threshold, self.stability_offset)
        return SamResult(
            masks=logits > self.mask_threshold,
            scores=iou_predictions[idx, chosen].astype(np.float32),
            stability=stab.astype(np.float32),
            chosen=chosen.astype(np.int64),
            low_res_logits=low_res,
            iou_predictions=iou_predictions,
            image_size=self.original_size,
            frame_id=self.frame_id,
        )
