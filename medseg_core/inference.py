"""Batch inference from model bundles: arrays in, masks / probabilities / labels out.

``Segmenter`` pre-processes with the bundle config (``input_size``, ``in_channels``, ``mean``,
``std``, ``threshold``, ``inference: {mode, tile_overlap}``) and returns maps at each image's
original size, either by resizing to the model input and back (mode ``resize``) or by
overlap-tile inference (mode ``tile``). ``Classifier`` labels (image, mask) pairs and ``Chain``
runs both and summarises each lesion.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medseg_core.io import MAX_TILE_WORK_PIXELS, ImageTooLargeError, mask_2d
from medseg_core.postprocess import keep_largest, zero_outside_largest
from medseg_core.precision import amp_dtype, cuda_devices
from medseg_core.transforms import normalize_batch, resize_image, resize_mask, to_channels, to_size

if TYPE_CHECKING:
    from medseg_core.checkpoint import Bundle

__all__ = ["Segmenter", "Classifier", "Chain", "to_channels", "model_input", "mask_bbox"]

MODES = ("resize", "tile")


def mask_bbox(mask: np.ndarray) -> list[int] | None:
    """[x0, y0, x1, y1] (inclusive-exclusive) of the non-zero pixels, None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def model_input(image: np.ndarray, channels: int, size: int | Sequence[int]) -> np.ndarray:
    """``resize_image(to_channels(image, channels), size)``, cheaper for a grey image wanted in
    3 channels: its one plane is resized before it is repeated (the same pixels)."""
    grey = np.ndim(image) == 2 or np.shape(image)[2] in (1, 2)  # grey, grey + alpha
    return to_channels(resize_image(to_channels(image, 1 if grey else channels), size), channels)


def check_threshold(value: Any) -> float | None:
    """The ``threshold`` setting: None (the segmentation bundle's) or a probability strictly
    between 0 and 1, as the serving endpoint accepts; anything else raises ValueError (jobs call it
    at start-up)."""
    if value is None:
        return None
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = math.nan
    if isinstance(value, bool) or not 0.0 < t < 1.0:  # NaN fails too
        raise ValueError(f"threshold={value!r} is invalid: it must be a probability strictly "
                         "between 0 and 1, or null for the segmentation bundle's threshold")
    return t


def mask_settings(config: Mapping[str, Any]) -> tuple[float, bool, bool]:
    """A segmentation bundle's mask threshold (0.5 when unset), ``inference.flip`` and
    ``inference.keep_largest``."""
    inference = config.get("inference") or {}
    threshold = config.get("threshold")
    return (0.5 if threshold is None else float(threshold), bool(inference.get("flip", False)),
            bool(inference.get("keep_largest", False)))


def foreground_probabilities(model: torch.nn.Module, x: torch.Tensor, flip: bool = False,
                             autocast: Any = nullcontext) -> torch.Tensor:
    """A segmentation model's foreground probabilities (B, H, W) float32 for normalised images
    (B, C, H, W) (its first output where it gives several); with ``flip``, the mean of the
    image's and its mirror image's. ``autocast`` makes the context the model runs in."""

    def once(t: torch.Tensor) -> torch.Tensor:
        with autocast():
            out = model(t)
        if isinstance(out, (list, tuple)):
            out = out[0]
        return torch.sigmoid(out[:, 0].float())

    probs = once(x)
    if flip:
        probs = (probs + once(x.flip(-1)).flip(-1)) / 2
    return probs


def model_masks(model: torch.nn.Module, x: torch.Tensor, threshold: float, flip: bool = False,
                largest: bool = False, autocast: Any = nullcontext) -> torch.Tensor:
    """Masks (B, H, W) bool at the model's resolution for normalised images, as ``Segmenter``
    decides them there: probability (flip-averaged) above ``threshold``, and with ``largest``
    only the largest component."""
    mask = foreground_probabilities(model, x, flip, autocast) > threshold
    return keep_largest(mask) if largest else mask


def _check_images(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    if isinstance(images, np.ndarray) and images.ndim != 4:
        raise TypeError("pass a list of images (or an (N,H,W,C) array), not a single image")
    images = list(images)
    for i, image in enumerate(images):
        if not isinstance(image, np.ndarray):
            # a PIL image, bytes or a path failed deep inside, or passed one model and not the other
            raise TypeError(f"image {i} is a {type(image).__name__}, not a numpy array: decode "
                            "it first (medseg_core.io.decode_image for bytes or a file, "
                            "np.asarray for a PIL image)")
    return images


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def prefers_channels_last(model: torch.nn.Module) -> bool:
    """Whether inference should run `model` in channels_last (NHWC) memory format.

    Convolutions and batch norm run ~1.3-1.4x faster per image in NHWC on CPU (oneDNN) and
    on GPU; instance and group norm do not (improved_unet measured ~10-20 % slower on CPU),
    so models with those layers stay NCHW. Results are the same up to float rounding.
    """
    slow = (torch.nn.InstanceNorm2d, torch.nn.GroupNorm)
    return not any(isinstance(m, slow) for m in model.modules())


class _Runner:
    """Shared model/device/config handling for the two predictors."""

    task = ""

    def __init__(self, bundle: Bundle, device: str | torch.device, batch_size: int,
                 amp: bool | None, channels_last: bool | None = None) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        task = bundle.config.get("task")
        if task != self.task:  # the other model's bundle failed only at its first forward pass
            raise ValueError(f"model bundle {getattr(bundle, 'uri', None) or ''} is a {task!r} "
                             f"bundle; {type(self).__name__} needs a {self.task!r} one")
        self.bundle = bundle
        self.config: dict[str, Any] = dict(bundle.config)
        self.device = torch.device(device)
        if self.device.type == "cuda" and (self.device.index or 0) >= cuda_devices():
            # else torch's bare AssertionError ("Torch not compiled with CUDA enabled")
            raise ValueError(f"device {device!s}: torch sees no such CUDA device here; use "
                             "'cpu', or run where that GPU is")
        self.batch_size = int(batch_size)
        self.model = bundle.model.to(self.device).eval()
        self.inference: dict[str, Any] = dict(self.config.get("inference") or {})
        if channels_last is None:
            channels_last = self.inference.get("channels_last")
        self.channels_last = (prefers_channels_last(self.model) if channels_last is None
                              else bool(channels_last))
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.input_size = to_size(self.config["input_size"])
        self.in_channels = int(self.config.get("in_channels", 3))
        self.mean = self.config.get("mean", 0.0)
        self.std = self.config.get("std", 1.0)
        wanted = self.device.type == "cuda" if amp is None else bool(amp)
        self.amp_dtype = amp_dtype(self.device, gpu=wanted, cpu=wanted, setting="amp")

    @property
    def version(self) -> str | None:
        return getattr(self.bundle, "version", None)

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _normalize(self, batch: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(batch).to(self.device, non_blocking=True)
        return self._layout(normalize_batch(tensor, self.mean, self.std))


def resize_probabilities(prob: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (h, w) probability map resized bilinearly to ``size``, antialiased along each axis it
    shrinks. Where one axis shrinks and the other grows, each is resized on its own, the
    shrinking one first: in one call PyTorch's antialiased kernel took 7 s to stretch a 256 px
    map to a 1 x 4,000,000 image (0.06 s in two), and a 4,000,000 x 1 one came out unlike its
    transpose."""
    h, w = prob.shape
    out = prob[None, None]
    grow_h, grow_w = size[0] > h, size[1] > w
    if grow_h != grow_w and size[0] != h and size[1] != w:
        first = (h, size[1]) if grow_h else (size[0], w)
        out = F.interpolate(out, size=first, mode="bilinear", align_corners=False,
                            antialias=True)
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
    else:
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=False,
                            antialias=size[0] < h or size[1] < w)
    return out[0, 0].clamp_(0.0, 1.0)  # antialiased filtering can overshoot by an ulp


class Segmenter(_Runner):
    """Binary segmentation with a segmentation bundle.

    Args:
        bundle: a loaded bundle (``.model``, ``.config``, ``.version``).
        device: torch device for the model.
        batch_size: images (mode resize) or tiles (mode tile) per forward pass.
        mode, tile_overlap: override ``config["inference"]`` (``tile_overlap``: pixels, or a
            fraction of the tile size when below 1; default 0.25).
        amp: bf16 autocast; default on for CUDA devices, off on CPUs. True on a CPU turns it on
            where the CPU computes bf16 natively (`precision.native_bf16`; the default U-Net
            ran 1.9x faster on such a CPU), and warns and stays float32 where it does not.
        channels_last: run the model in NHWC memory format (override of
            ``config["inference"]["channels_last"]``; default: `prefers_channels_last`).
        flip: test-time augmentation, the probabilities averaged over the image and its
            left-right mirror image (override of ``config["inference"]["flip"]``, default off;
            twice the compute).
        keep_largest: keep only the largest 8-connected component of each mask (override of
            ``config["inference"]["keep_largest"]``, default off). In resize mode it is found at
            the model's resolution and the probabilities outside it are zeroed, so
            ``predict_proba`` shows it too; the component is taken at the bundle's threshold.

        max_work_pixels: tile mode refuses (`ImageTooLargeError`) an image whose tiles hold
            more pixels than this (None: no limit). A 1 x 40M-pixel image is small in pixels
            but is a row of 200,000 whole tiles, 13 G pixels for the model.

    Tile mode: tiles are ``input_size``; neighbouring tiles overlap by ``tile_overlap`` pixels and
    only each tile's centre (a margin of ``tile_overlap // 2`` removed on every side) is kept, the
    image being reflect-padded so border pixels also get a full context (U-Net overlap-tile).
    """

    task = "segmentation"

    def __init__(
        self,
        bundle: Bundle,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        *,
        mode: str | None = None,
        tile_overlap: int | None = None,
        amp: bool | None = None,
        keep_largest: bool | None = None,
        flip: bool | None = None,
        channels_last: bool | None = None,
        max_work_pixels: int | None = MAX_TILE_WORK_PIXELS,
    ) -> None:
        super().__init__(bundle, device, batch_size, amp, channels_last)
        self.max_work_pixels = max_work_pixels
        inference = self.inference
        self.threshold, own_flip, own_largest = mask_settings(self.config)
        self.keep_largest = own_largest if keep_largest is None else keep_largest
        self.flip = own_flip if flip is None else flip
        self.mode = mode or inference.get("mode", "resize")
        if self.mode not in MODES:
            raise ValueError(f"unknown inference mode {self.mode!r}; expected one of {MODES}")
        if tile_overlap is None:
            tile_overlap = inference.get("tile_overlap", 0.25)
        self.tile_overlap: int | float = tile_overlap
        if not tile_overlap >= 0:
            raise ValueError(f"tile_overlap must be >= 0, got {tile_overlap}")

    @property
    def margins(self) -> tuple[int, int]:
        """Pixels dropped on each side of a tile, per axis (at most what leaves a 1-pixel core).

        ``tile_overlap`` below 1 is a fraction of the tile size, otherwise a pixel count.
        """
        margins = []
        for side in self.input_size:
            ov = self.tile_overlap
            overlap = round(ov * side) if isinstance(ov, float) and ov < 1 else int(ov)
            margins.append(min(overlap // 2, (side - 1) // 2))
        return margins[0], margins[1]

    @property
    def tile_core(self) -> tuple[int, int]:
        """Height and width of the centre kept from each tile (the tile less its margins)."""
        (th, tw), (mh, mw) = self.input_size, self.margins
        return th - 2 * mh, tw - 2 * mw

    def work_pixels(self, height: int, width: int) -> int:
        """Pixels the model runs over for an image of this size (tile mode: every tile's)."""
        th, tw = self.input_size
        if self.mode != "tile":
            return th * tw
        ch, cw = self.tile_core
        return math.ceil(height / ch) * math.ceil(width / cw) * th * tw

    def check_work(self, shape: Sequence[int]) -> None:
        """Raise `ImageTooLargeError` when an image of ``shape`` (H, W, ...) would make the
        model run over more than ``max_work_pixels`` pixels."""
        work = self.work_pixels(int(shape[0]), int(shape[1]))
        if self.max_work_pixels is not None and work > self.max_work_pixels:
            raise ImageTooLargeError(
                f"{shape[0]}x{shape[1]} image: tile inference would run the model over {work} "
                f"pixels, more than {self.max_work_pixels}")

    def _probabilities(self, batch: np.ndarray) -> torch.Tensor:
        """uint8 (B,H,W,C) -> foreground probabilities (B,H,W) float32 on the device
        (with ``flip``: the mean of the image's and its mirror image's)."""
        return foreground_probabilities(self.model, self._normalize(batch), self.flip,
                                        self._autocast)

    def _predict_resize(self, images: list[np.ndarray]) -> list[np.ndarray]:
        results: list[np.ndarray] = []
        for part in _chunks(len(images), self.batch_size):
            batch = np.stack([model_input(im, self.in_channels, self.input_size)
                              for im in images[part]])
            probs = self._probabilities(batch)
            if self.keep_largest:  # at the model's resolution: cheap, and the same component
                probs = probs * keep_largest(probs > self.threshold)
            for im, prob in zip(images[part], probs):
                size = im.shape[:2]
                if tuple(prob.shape) != size:
                    prob = resize_probabilities(prob, size)
                results.append(prob.cpu().numpy().astype(np.float32, copy=False))
        return results

    def _predict_tile(self, images: list[np.ndarray]) -> list[np.ndarray]:
        th, tw = self.input_size
        mh, mw = self.margins
        ch, cw = self.tile_core
        outputs: list[np.ndarray] = []
        tiles: list[tuple[int, int, int, np.ndarray]] = []  # (image index, row, col, tile)
        for index, image in enumerate(images):
            h, w = image.shape[:2]
            ny, nx = math.ceil(h / ch), math.ceil(w / cw)
            # After padding, tile (iy, ix) starts at (iy * ch, ix * cw) and its centre covers
            # image rows iy * ch .. (iy + 1) * ch; the grid's far side is padded to a whole tile.
            padded = np.pad(image, ((mh, ny * ch - h + mh), (mw, nx * cw - w + mw), (0, 0)),
                            mode="reflect")
            outputs.append(np.zeros((ny * ch, nx * cw), dtype=np.float32))
            for iy in range(ny):
                for ix in range(nx):
                    y, x = iy * ch, ix * cw
                    tiles.append((index, y, x, padded[y:y + th, x:x + tw]))
        for part in _chunks(len(tiles), self.batch_size):
            chunk = tiles[part]
            probs = self._probabilities(np.stack([t[3] for t in chunk]))
            centres = probs[:, mh:mh + ch, mw:mw + cw].cpu().numpy()
            for (index, y, x, _), centre in zip(chunk, centres):
                outputs[index][y:y + ch, x:x + cw] = centre
        results = [np.ascontiguousarray(out[:im.shape[0], :im.shape[1]])
                   for out, im in zip(outputs, images)]
        if self.keep_largest:
            for out in results:
                zero_outside_largest(out, self.threshold)
        return results

    def predict_proba(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Foreground probability maps (float32 HxW, each image's original size)."""
        images = _check_images(images)
        if not images:
            return []
        for im in images:  # before any allocation
            self.check_work(im.shape)
        with torch.inference_mode():
            if self.mode == "tile":
                return self._predict_tile([to_channels(im, self.in_channels) for im in images])
            return self._predict_resize(images)

    def predict(self, images: Sequence[np.ndarray], threshold: float | None = None) -> list[np.ndarray]:
        """Binary masks (uint8 {0,1} HxW, original sizes): probability > threshold.

        ``threshold`` defaults to the bundle's ``threshold``.
        """
        checked = check_threshold(threshold)  # 1.5 or NaN made every mask empty, -0.2 full
        t = self.threshold if checked is None else checked
        return [(p > t).astype(np.uint8) for p in self.predict_proba(images)]


class Classifier(_Runner):
    """Lesion classification of (image, mask) pairs with a classification bundle.

    Images are resized (bilinear) and masks (nearest) to the bundle's ``input_size``; integer or
    bool masks count non-zero pixels as lesion, float masks are taken as probabilities in [0, 1].
    """

    task = "classification"

    def __init__(
        self,
        bundle: Bundle,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        *,
        amp: bool | None = None,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__(bundle, device, batch_size, amp, channels_last)
        names = self.config.get("class_names")
        self.class_names: tuple[str, ...] | None = tuple(names) if names else None
        # classes without a lesion: the chain clears the mask of an image given one of them
        # (chosen on validation when training, `pipelines.tuning.choose_mask_clearing`)
        self.lesion_free: tuple[str, ...] = tuple(self.config.get("lesion_free_classes") or ())

    def _mask(self, mask: np.ndarray) -> np.ndarray:
        mask = mask_2d(mask, "masks")
        h, w = self.input_size
        if np.issubdtype(mask.dtype, np.floating):
            resized = Image.fromarray(np.clip(mask, 0, 1).astype(np.float32))
            return np.asarray(resized.resize((w, h), Image.BILINEAR), dtype=np.float32)
        return resize_mask((mask > 0).astype(np.uint8), self.input_size).astype(np.float32)

    def predict(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> np.ndarray:
        """Class probabilities (softmax), float32 array (N, num_classes)."""
        images = _check_images(images)
        masks = [mask_2d(m, f"mask {i}") for i, m in enumerate(masks)]
        if len(images) != len(masks):
            raise ValueError(f"got {len(images)} images but {len(masks)} masks")
        for i, (im, m) in enumerate(zip(images, masks)):
            if np.shape(im)[:2] != np.shape(m)[:2]:
                raise ValueError(f"image {i} has size {np.shape(im)[:2]} but its mask {np.shape(m)[:2]}")
        out: list[np.ndarray] = []
        with torch.inference_mode():
            for part in _chunks(len(images), self.batch_size):
                batch = np.stack([model_input(im, self.in_channels, self.input_size)
                                  for im in images[part]])
                mask = np.stack([self._mask(m) for m in masks[part]])[:, None]
                x = self._normalize(batch)
                m = self._layout(torch.from_numpy(mask).to(self.device))
                with self._autocast():
                    logits = self.model(x, m)
                out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        if not out:
            k = len(self.class_names) if self.class_names else 0
            return np.zeros((0, k), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def names_for(self, num_classes: int) -> tuple[str, ...]:
        """Class names for ``num_classes`` outputs (``class_<i>`` where the bundle has none)."""
        if self.class_names and len(self.class_names) == num_classes:
            return self.class_names
        return tuple(f"class_{i}" for i in range(num_classes))


class Chain:
    """Segment, then classify the lesion; one summary dict per image.

    ``classifier`` may be None (segmentation only): label is then -1, label_name None and
    probabilities empty.
    """

    def __init__(self, segmenter: Segmenter, classifier: Classifier | None = None) -> None:
        self.segmenter = segmenter
        self.classifier = classifier

    @classmethod
    def from_uris(
        cls,
        seg_uri: str,
        cls_uri: str | None = None,
        device: str | torch.device = "cpu",
        storage_options: dict | None = None,
        batch_size: int = 16,
    ) -> Chain:
        """Load both bundles (any fsspec URL) and build the chain."""
        from medseg_core.checkpoint import load_bundle

        seg = Segmenter(load_bundle(seg_uri, storage_options=storage_options), device, batch_size)
        clf = None
        if cls_uri is not None:
            clf = Classifier(load_bundle(cls_uri, storage_options=storage_options), device, batch_size)
        return cls(seg, clf)

    @property
    def versions(self) -> dict[str, str | None]:
        """Bundle versions, ``{"segmenter": ..., "classifier": ...}``."""
        return {
            "segmenter": self.segmenter.version,
            "classifier": None if self.classifier is None else self.classifier.version,
        }

    def predict(self, images: Sequence[np.ndarray], threshold: float | None = None) -> list[dict[str, Any]]:
        """Per image: mask (uint8 HxW), label, label_name, probabilities (name -> p),
        lesion_area_fraction and bbox ([x0, y0, x1, y1], None for an empty mask)."""
        images = _check_images(images)
        masks = self.segmenter.predict(images, threshold)
        if self.classifier is not None and images:
            probs = self.classifier.predict(images, masks)
            names = self.classifier.names_for(probs.shape[1])
        else:
            probs, names = None, ()
        lesion_free = self.classifier.lesion_free if self.classifier is not None else ()
        return [summarize_prediction(mask, None if probs is None else probs[i], names,
                                     lesion_free)
                for i, mask in enumerate(masks)]


def summarize_prediction(mask: np.ndarray, probabilities: np.ndarray | None,
                         names: Sequence[str], lesion_free: Sequence[str] = ()
                         ) -> dict[str, Any]:
    """One image's result from its mask and class probabilities: mask, label (-1 without a
    classifier), label_name, probabilities (name -> p), lesion_area_fraction and bbox. An
    image classified as one of `lesion_free` (the classifier bundle's classes without a
    lesion, e.g. BUSI's normal) gets an empty mask."""
    result: dict[str, Any] = {"mask": mask, "label": -1, "label_name": None, "probabilities": {}}
    if probabilities is not None:
        label = int(np.argmax(probabilities))
        result.update(label=label, label_name=names[label],
                      probabilities={n: float(p) for n, p in zip(names, probabilities)})
        if names[label] in lesion_free and mask.any():
            result["mask"] = mask = np.zeros_like(mask)
    result.update(lesion_area_fraction=float(mask.mean()) if mask.size else 0.0,
                  bbox=mask_bbox(mask))
    return result
