"""Joint image + mask transforms.

CPU side (numpy/Pillow): a sample is a dict with ``image`` (uint8 HxWxC) and optionally ``mask``
(uint8 HxW, 0/1); other keys pass through untouched. Every transform is
``__call__(sample, rng) -> sample`` and draws its randomness only from ``rng``, so the same seed
gives the same output. Geometric transforms apply one set of parameters to image and mask
(image bilinear, mask nearest) so the two stay aligned.

Torch side: ``normalize_batch`` turns a uint8 (B,H,W,C) batch into normalized float (B,C,H,W), and
``augment_batch`` / ``GpuAugment`` apply the same kinds of augmentation to a whole batch on any
device (flips, rotation/shift/scale through ``affine_grid`` + ``grid_sample``, brightness and
contrast).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medseg_core.io import rgb_to_grey

Sample = dict[str, Any]

__all__ = [
    "Sample",
    "Resize",
    "RandomFlip",
    "RandomAffine",
    "RandomBrightnessContrast",
    "Compose",
    "build_transforms",
    "resize_image",
    "resize_mask",
    "to_size",
    "to_channels",
    "normalize_batch",
    "to_unit_float",
    "standardize",
    "augment_batch",
    "GpuAugment",
]


# ----------------------------------------------------------------------------- helpers


def to_size(size: int | Sequence[int]) -> tuple[int, int]:
    """``size`` as (height, width); an int means a square."""
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        if len(size) != 2:
            raise ValueError(f"size must be an int or [height, width], got {size!r}")
        h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return h, w


def _channels_last(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"image must be HxW or HxWxC, got shape {image.shape}")
    return image


def _pil_apply(image: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """Apply a PIL operation to a uint8 HxWxC array.

    Three channels go through PIL's RGB path in one call; any other count one 8-bit plane at a
    time (the same result per channel, and the RGB call is about 20 % cheaper than three).
    """
    image = _channels_last(image)
    if image.dtype != np.uint8:
        raise TypeError(f"image must be uint8, got {image.dtype}")
    if image.shape[2] == 3:
        return np.array(fn(Image.fromarray(np.ascontiguousarray(image), "RGB")))
    planes = [np.asarray(fn(Image.fromarray(np.ascontiguousarray(image[:, :, c]))))
              for c in range(image.shape[2])]
    return np.stack(planes, axis=2)


def resize_image(image: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Resize a uint8 HxW(xC) image to ``size`` (h, w) with bilinear filtering; returns HxWxC."""
    h, w = to_size(size)
    image = _channels_last(image)
    if image.shape[:2] == (h, w):
        return image.copy()
    return _pil_apply(image, lambda im: im.resize((w, h), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Resize a uint8 HxW mask to ``size`` (h, w) with nearest-neighbour sampling."""
    h, w = to_size(size)
    if mask.shape[:2] == (h, w):
        return mask.copy()
    return np.asarray(Image.fromarray(np.ascontiguousarray(mask.astype(np.uint8, copy=False)))
                      .resize((w, h), Image.NEAREST))


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """uint8 HxW / HxWx{1,2,3,4} image -> uint8 HxWx``channels`` (1 or 3).

    Alpha is dropped; RGB -> grey uses PIL's ITU-R 601-2 luma (as decoding with one channel
    does); grey -> RGB repeats the plane.
    """
    image = np.asarray(image)
    if image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4) or min(image.shape[:2]) < 1:
        raise ValueError(f"images must be HxW or HxWx{{1,2,3,4}}, got shape {image.shape}")
    if image.shape[2] in (2, 4):  # grey + alpha, RGB + alpha
        image = image[:, :, : image.shape[2] - 1]
    have = image.shape[2]
    if have == channels:
        return np.ascontiguousarray(image)
    if channels == 1:
        return rgb_to_grey(image)[:, :, None]
    if channels == 3:
        return np.repeat(image, 3, axis=2)
    raise ValueError(f"cannot convert a {have}-channel image to {channels} channels")


def _with(sample: Sample, image: np.ndarray, mask: np.ndarray | None) -> Sample:
    out = dict(sample)
    out["image"] = image
    if mask is not None:
        out["mask"] = mask
    return out


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng()


# ----------------------------------------------------------------------------- CPU transforms


class Resize:
    """Resize image (bilinear) and mask (nearest) to a fixed (height, width)."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = to_size(size)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        mask = sample.get("mask")
        return _with(sample, resize_image(sample["image"], self.size),
                     None if mask is None else resize_mask(mask, self.size))

    def __repr__(self) -> str:
        return f"Resize(size={self.size})"


class RandomFlip:
    """Flip horizontally with probability ``p_h`` and vertically with probability ``p_v``."""

    def __init__(self, p_h: float = 0.5, p_v: float = 0.0) -> None:
        self.p_h = float(p_h)
        self.p_v = float(p_v)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _rng(rng)
        # Always draw both numbers so the stream consumed does not depend on the outcome.
        flip_h, flip_v = rng.random() < self.p_h, rng.random() < self.p_v
        image = _channels_last(sample["image"])
        mask = sample.get("mask")
        if flip_h:
            image = image[:, ::-1]
            mask = None if mask is None else mask[:, ::-1]
        if flip_v:
            image = image[::-1]
            mask = None if mask is None else mask[::-1]
        return _with(sample, np.ascontiguousarray(image),
                     None if mask is None else np.ascontiguousarray(mask))

    def __repr__(self) -> str:
        return f"RandomFlip(p_h={self.p_h}, p_v={self.p_v})"


def _affine_forward(angle_deg: float, shift: tuple[float, float], scale: float) -> np.ndarray:
    """2x3 matrix mapping centred input pixel coordinates (x, y) to centred output coordinates."""
    theta = math.radians(angle_deg)
    cos, sin = math.cos(theta) * scale, math.sin(theta) * scale
    return np.array([[cos, -sin, shift[0]], [sin, cos, shift[1]]], dtype=np.float64)


class RandomAffine:
    """Random rotation, shift and scale about the image centre, one matrix for image and mask.

    rotation ~ U(-max_rotate_deg, max_rotate_deg); shift ~ U(-max_shift, max_shift) times the
    width/height; scale ~ U(scale_range). The image is resampled bilinearly, the mask with
    nearest neighbour, both from the same inverse matrix; uncovered pixels are filled with 0.
    Applied with probability ``p``.
    """

    def __init__(
        self,
        max_rotate_deg: float = 0.0,
        max_shift: float = 0.0,
        scale_range: Sequence[float] = (1.0, 1.0),
        p: float = 1.0,
    ) -> None:
        if not 0 <= max_rotate_deg <= 180:
            raise ValueError(f"max_rotate_deg must be in [0, 180], got {max_rotate_deg}")
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
        self.max_rotate_deg = float(max_rotate_deg)
        self.max_shift = float(max_shift)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.p = float(p)

    def sample_params(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        """Draw the forward 2x3 matrix (centred pixel coordinates) for one image."""
        angle = rng.uniform(-self.max_rotate_deg, self.max_rotate_deg)
        tx = rng.uniform(-self.max_shift, self.max_shift) * width
        ty = rng.uniform(-self.max_shift, self.max_shift) * height
        scale = rng.uniform(*self.scale_range)
        return _affine_forward(angle, (tx, ty), scale)

    @staticmethod
    def apply(sample: Sample, forward: np.ndarray) -> Sample:
        """Warp image and mask with a forward 2x3 matrix in centred pixel coordinates."""
        image = _channels_last(sample["image"])
        h, w = image.shape[:2]
        # PIL wants the inverse map (output -> input) in its continuous coordinates, where pixel
        # i spans [i, i + 1); both resamplers share it, which keeps image and mask aligned.
        lin = forward[:, :2]
        inv = np.linalg.inv(lin)
        centre = np.array([w / 2.0, h / 2.0])
        offset = centre - inv @ (centre + forward[:, 2])
        data = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
        size = (w, h)

        def warp(resample: int) -> Callable[[Image.Image], Image.Image]:
            return lambda im: im.transform(size, Image.AFFINE, data, resample=resample, fillcolor=0)

        out_image = _pil_apply(image, warp(Image.BILINEAR))
        mask = sample.get("mask")
        out_mask = None
        if mask is not None:
            out_mask = warp(Image.NEAREST)(Image.fromarray(np.ascontiguousarray(mask)))
            out_mask = np.asarray(out_mask)
        return _with(sample, out_image, out_mask)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _rng(rng)
        h, w = _channels_last(sample["image"]).shape[:2]
        apply = rng.random() < self.p
        forward = self.sample_params(rng, h, w)
        return self.apply(sample, forward) if apply else sample

    def __repr__(self) -> str:
        return (f"RandomAffine(max_rotate_deg={self.max_rotate_deg}, max_shift={self.max_shift}, "
                f"scale_range={self.scale_range}, p={self.p})")


class RandomBrightnessContrast:
    """Image-only intensity jitter: ``(x - mean) * c + mean + b * 255``.

    c ~ U(1 - contrast, 1 + contrast), b ~ U(-brightness, brightness); ``mean`` is the image's
    mean grey level. The mask is left untouched.
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, p: float = 1.0) -> None:
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.p = float(p)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _rng(rng)
        apply = rng.random() < self.p
        alpha = rng.uniform(1.0 - self.contrast, 1.0 + self.contrast)
        beta = rng.uniform(-self.brightness, self.brightness) * 255.0
        if not apply:
            return sample
        image = _channels_last(sample["image"]).astype(np.float32)
        mean = float(image.mean())
        image = (image - mean) * alpha + mean + beta
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        return _with(sample, image, None)

    def __repr__(self) -> str:
        return (f"RandomBrightnessContrast(brightness={self.brightness}, "
                f"contrast={self.contrast}, p={self.p})")


class Compose:
    """Apply transforms in order, all drawing from the same ``rng``."""

    def __init__(self, transforms: Sequence[Callable[..., Sample]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _rng(rng)
        for t in self.transforms:
            sample = t(sample, rng)
        return sample

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(repr(t) for t in self.transforms) + "])"


def _scale_range(value: float | Sequence[float] | None) -> tuple[float, float]:
    """``scale`` config: (low, high), or a float s meaning (1 - s, 1 + s)."""
    if value is None:
        return (1.0, 1.0)
    if isinstance(value, (int, float)):
        return (1.0 - float(value), 1.0 + float(value))
    return (float(value[0]), float(value[1]))


def _flip_p(value: float | bool | None) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool):
        return 0.5 if value else 0.0
    return float(value)


# augmentation amplitudes and the ranges that keep them meaningful (a negative one switched the
# step off without a word; contrast above 1 inverted images)
_AMPLITUDES = {"rotate": (180.0, True), "shift": (1.0, False), "brightness": (1.0, True),
               "contrast": (1.0, False)}


def _number(cfg: dict[str, Any], key: str, convert: Callable[[Any], float]) -> float:
    try:
        return convert(cfg.get(key))
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"{key} must be a number, got {cfg.get(key)!r}") from None


def check_augment(cfg: dict[str, Any]) -> None:
    """Refuse augmentation settings outside their meaning, naming the key: flip probabilities
    in [0, 1], rotate in [0, 180] degrees, shift and contrast in [0, 1), brightness in [0, 1],
    scale a number in [0, 1) or a range (low, high) with 0 < low <= high; any other key
    (a misspelt one was ignored) is refused."""
    unknown = sorted(set(cfg) - {"size", "hflip", "vflip", "scale", *_AMPLITUDES})
    if unknown:
        raise ValueError(f"unknown augmentation key(s) {unknown}; known: hflip, vflip, rotate, "
                         "shift, scale, brightness, contrast")
    for key in ("hflip", "vflip"):
        p = _number(cfg, key, _flip_p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{key} is a probability in [0, 1], got {cfg.get(key)!r}")
    for key, (top, closed) in _AMPLITUDES.items():
        value = _number(cfg, key, lambda v: float(v or 0.0))
        if not (0.0 <= value <= top if closed else 0.0 <= value < top):
            raise ValueError(f"{key} must be in [0, {top:g}{']' if closed else ')'}, "
                             f"got {cfg.get(key)!r}")
    scale = cfg.get("scale")
    is_range = isinstance(scale, Sequence) and not isinstance(scale, str) and len(scale) == 2
    try:
        if not (scale is None or isinstance(scale, (int, float)) or is_range):
            raise ValueError
        low, high = _scale_range(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a number or a range [low, high], got {scale!r}") from None
    if not 0.0 < low <= high:
        raise ValueError(f"scale must be a number in [0, 1) or a range [low, high] with "
                         f"0 < low <= high, got {scale!r}")


def build_transforms(cfg: dict[str, Any], train: bool) -> Compose:
    """Pipeline from config keys size, hflip, vflip, rotate, shift, scale, brightness, contrast.

    ``hflip``/``vflip`` are probabilities (``true`` means 0.5), ``rotate`` the maximum angle in
    degrees, ``shift`` the maximum fraction of the size, ``scale`` a (low, high) range or a float
    s for (1 - s, 1 + s), ``brightness``/``contrast`` the jitter amplitudes. Evaluation
    (``train=False``) only resizes. Resizing comes first so augmentation runs at the model size.
    """
    cfg = dict(cfg or {})
    steps: list[Callable[..., Sample]] = []
    if cfg.get("size") is not None:
        steps.append(Resize(cfg["size"]))
    if not train:
        return Compose(steps)
    check_augment(cfg)
    p_h, p_v = _flip_p(cfg.get("hflip")), _flip_p(cfg.get("vflip"))
    if p_h > 0 or p_v > 0:
        steps.append(RandomFlip(p_h, p_v))
    rotate = float(cfg.get("rotate") or 0.0)
    shift = float(cfg.get("shift") or 0.0)
    scale = _scale_range(cfg.get("scale"))
    if rotate > 0 or shift > 0 or scale != (1.0, 1.0):
        steps.append(RandomAffine(rotate, shift, scale))
    brightness = float(cfg.get("brightness") or 0.0)
    contrast = float(cfg.get("contrast") or 0.0)
    if brightness > 0 or contrast > 0:
        steps.append(RandomBrightnessContrast(brightness, contrast))
    return Compose(steps)


# ----------------------------------------------------------------------------- torch side


def _per_channel(values: float | Sequence[float] | torch.Tensor, channels: int,
                 like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32, device=like.device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(channels)
    elif t.numel() != channels:
        raise ValueError(f"expected 1 or {channels} values per channel, got {t.numel()}")
    return t.reshape(1, channels, 1, 1)


def to_unit_float(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (B,H,W,C) -> float32 (B,C,H,W) in [0, 1], on the input's device."""
    images = torch.as_tensor(images)
    if images.ndim != 4:
        raise ValueError(f"expected a (B,H,W,C) batch, got shape {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()


def standardize(images: torch.Tensor, mean: float | Sequence[float],
                std: float | Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel for a float (B,C,H,W) batch in 0-1 units."""
    c = images.shape[1]
    return (images - _per_channel(mean, c, images)) / _per_channel(std, c, images)


def normalize_batch(images: torch.Tensor | np.ndarray, mean: float | Sequence[float],
                    std: float | Sequence[float]) -> torch.Tensor:
    """uint8 (B,H,W,C) -> float32 (B,C,H,W), ``(x / 255 - mean) / std`` per channel.

    ``mean``/``std`` are in 0-1 units, one value or one per channel. Runs on the input's device.
    """
    return standardize(to_unit_float(images), mean, std)


def _uniform(generator: torch.Generator | None, n: int, low: float, high: float,
             device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float32)
    return (low + (high - low) * u).to(device)


def augment_batch(
    images: torch.Tensor,
    masks: torch.Tensor | None,
    generator: torch.Generator | None,
    cfg: dict[str, Any],
    *,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment a float (B,C,H,W) image batch and its (B,1,H,W) masks on the batch's device.

    Same config keys and meaning as :func:`build_transforms` (``size`` is ignored). Each item
    gets its own flips, rotation/shift/scale (one ``affine_grid`` per item shared by image,
    bilinear, and mask, nearest; fill 0) and brightness/contrast (image only; contrast scales
    about each channel's mean). Random numbers come from ``generator`` (on its own device), so a
    seed reproduces the batch. Masks come back in their input dtype.

    With ``mean``/``std`` the images are taken as normalized with them (the output of
    :func:`normalize_batch`): augmentation then happens in 0-1 units, so fill is black,
    brightness is a fraction of full scale and intensities are clamped to [0, 1], as on the CPU
    path. Without them, intensities are used as they are (fill 0, brightness in the images'
    units, no clamping).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B,C,H,W), got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    dev = images.device
    if masks is not None and (masks.ndim != 4 or masks.shape[0] != b or masks.shape[2:] != (h, w)):
        raise ValueError(f"masks must be (B,1,H,W) matching images, got {tuple(masks.shape)}")
    mask_dtype = None if masks is None else masks.dtype
    m = None if masks is None else masks.to(images.dtype)
    unit = mean is not None or std is not None
    if unit:
        c = images.shape[1]
        mean_t = _per_channel(0.0 if mean is None else mean, c, images).to(images.dtype)
        std_t = _per_channel(1.0 if std is None else std, c, images).to(images.dtype)
        images = images * std_t + mean_t

    # Draw every random number up front, in a fixed order, whatever the config enables.
    flip_h = _uniform(generator, b, 0, 1, dev) < _flip_p(cfg.get("hflip"))
    flip_v = _uniform(generator, b, 0, 1, dev) < _flip_p(cfg.get("vflip"))
    rotate = float(cfg.get("rotate") or 0.0)
    shift = float(cfg.get("shift") or 0.0)
    lo, hi = _scale_range(cfg.get("scale"))
    angle = torch.deg2rad(_uniform(generator, b, -rotate, rotate, dev))
    tx = _uniform(generator, b, -shift, shift, dev) * w
    ty = _uniform(generator, b, -shift, shift, dev) * h
    scale = _uniform(generator, b, lo, hi, dev)
    brightness = float(cfg.get("brightness") or 0.0)
    contrast = float(cfg.get("contrast") or 0.0)
    beta = _uniform(generator, b, -brightness, brightness, dev)
    alpha = _uniform(generator, b, 1.0 - contrast, 1.0 + contrast, dev)

    # Flips are exact index reversals, not resampling.
    fh, fv = flip_h.view(b, 1, 1, 1), flip_v.view(b, 1, 1, 1)
    images = torch.where(fh, images.flip(3), images)
    images = torch.where(fv, images.flip(2), images)
    if m is not None:
        m = torch.where(fh, m.flip(3), m)
        m = torch.where(fv, m.flip(2), m)

    if rotate > 0 or shift > 0 or (lo, hi) != (1.0, 1.0):
        # Inverse map in centred pixel units, then expressed in grid_sample's normalized
        # coordinates (align_corners=False: x_norm = x_centred / (W / 2)), which keeps rotations
        # rigid on non-square images.
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        inv = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # (B,2,2)
        t = torch.stack([tx, ty], 1).unsqueeze(2)  # (B,2,1)
        d = torch.tensor([w / 2.0, h / 2.0], device=dev, dtype=torch.float32)
        lin = inv * d.view(1, 1, 2) / d.view(1, 2, 1)
        off = -(inv @ t).squeeze(2) / d.view(1, 2)
        theta = torch.cat([lin, off.unsqueeze(2)], 2).to(images.dtype)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False)
        if m is not None:
            m = F.grid_sample(m, grid, mode="nearest", padding_mode="zeros", align_corners=False)

    if brightness > 0 or contrast > 0:
        centre = images.mean(dim=(2, 3), keepdim=True)
        a, bb = alpha.view(b, 1, 1, 1).to(images.dtype), beta.view(b, 1, 1, 1).to(images.dtype)
        images = (images - centre) * a + centre + bb
        if unit:
            images = images.clamp(0.0, 1.0)

    if unit:
        images = (images - mean_t) / std_t
    if m is not None:
        m = m.to(mask_dtype)
    return images, m


class GpuAugment:
    """Callable wrapper around :func:`augment_batch` holding the config (and mean/std)."""

    def __init__(self, cfg: dict[str, Any], mean: float | Sequence[float] | None = None,
                 std: float | Sequence[float] | None = None) -> None:
        self.cfg = dict(cfg or {})
        self.mean = mean
        self.std = std

    def __call__(
        self,
        images: torch.Tensor,
        masks: torch.Tensor | None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return augment_batch(images, masks, generator, self.cfg, mean=self.mean, std=self.std)

    def __repr__(self) -> str:
        return f"GpuAugment({self.cfg})"
