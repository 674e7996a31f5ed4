"""Synthetic breast-ultrasound-like data in the BUSI layout, for tests, demos and smoke runs.

Each image is layered, depth-attenuated tissue with smooth texture, multiplied by laterally
elongated Rayleigh speckle. ``normal`` has no lesion (empty mask); ``benign`` a smooth dark oval
with a soft rim and posterior enhancement; ``malignant`` an irregular, spiculated dark lesion
with posterior shadowing. Distractors (dark fat lobules, vertical acoustic shadows) appear in
every class, so a raw intensity threshold does not find the lesion, but a small U-Net does.
Image ``i`` of class ``c`` depends only on (seed, c, i), so datasets are reproducible.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence

import numpy as np

from medseg_core.io import encode_mask_png, encode_png, write_bytes

DEFAULT_CLASSES = ("normal", "benign", "malignant")


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinear upsampling of a ``cells`` x ``cells`` random grid: a smooth field in ~[0, 1]."""
    grid = rng.random((cells + 1, cells + 1))
    t = np.linspace(0.0, cells, size)
    i0 = np.minimum(t.astype(int), cells - 1)
    f = t - i0
    rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def _speckle(rng: np.random.Generator, size: int) -> np.ndarray:
    """Multiplicative Rayleigh speckle with mean 1, smoothed along x (lateral grain)."""
    n = rng.rayleigh(np.sqrt(2.0 / np.pi), size=(size, size + 2))
    return (n[:, :-2] + 2 * n[:, 1:-1] + n[:, 2:]) / 4.0


def _ellipse_r(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, theta: float
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised elliptical radius (1 on the boundary) and polar angle around (cy, cx)."""
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(theta), np.sin(theta)
    u = (dx * c + dy * s) / rx
    v = (-dx * s + dy * c) / ry
    return np.hypot(u, v), np.arctan2(v, u)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def make_sample(
    kind: str, size: int = 128, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic (image uint8 HxW, mask uint8 HxW in {0, 1}); kind in normal/benign/malignant."""
    if kind not in DEFAULT_CLASSES:
        raise ValueError(f"kind must be one of {DEFAULT_CLASSES}, got {kind!r}")
    rng = rng if rng is not None else np.random.default_rng()
    coords = np.linspace(0.0, 1.0, size)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")

    # Tissue: bright skin line, wavy layers, texture, attenuation with depth.
    warp = 0.04 * np.sin(2 * np.pi * (xx * rng.uniform(0.5, 1.5) + rng.random()))
    layers = 0.5 + 0.18 * np.sin(2 * np.pi * (yy + warp) * rng.uniform(2.0, 4.0) + rng.random() * 6)
    skin = 0.6 * np.exp(-(((yy - rng.uniform(0.03, 0.08)) / 0.02) ** 2))
    texture = 0.5 + 0.5 * _smooth_field(rng, size, int(rng.integers(6, 12)))
    tissue = (layers * texture + skin) * (1.0 - rng.uniform(0.35, 0.6) * yy)

    # Distractors: dark, mostly horizontal fat lobules and vertical acoustic shadows.
    for _ in range(int(rng.integers(1, 5))):
        r, _ = _ellipse_r(
            yy,
            xx,
            rng.uniform(0.15, 0.9),
            rng.uniform(0.0, 1.0),
            rng.uniform(0.03, 0.08),
            rng.uniform(0.08, 0.25),
            rng.uniform(-0.3, 0.3),
        )
        tissue *= 1.0 - rng.uniform(0.3, 0.55) * _sigmoid((1.0 - r) / 0.25)
    if rng.random() < 0.5:
        x0, w = rng.uniform(0.1, 0.9), rng.uniform(0.04, 0.12)
        y0 = rng.uniform(0.2, 0.6)
        tissue *= 1.0 - rng.uniform(0.3, 0.5) * np.exp(-(((xx - x0) / w) ** 2)) * _sigmoid(
            (yy - y0) / 0.03
        )

    mask = np.zeros((size, size), dtype=bool)
    if kind != "normal":
        cy, cx = rng.uniform(0.3, 0.65), rng.uniform(0.25, 0.75)
        ry, rx = rng.uniform(0.08, 0.16), rng.uniform(0.1, 0.22)
        theta = rng.uniform(-0.4, 0.4)
        r, phi = _ellipse_r(yy, xx, cy, cx, ry, rx, theta)
        if kind == "benign":
            edge, depth, boundary = 0.08, rng.uniform(0.6, 0.8), np.ones_like(r)
        else:
            boundary = np.ones_like(r)
            for k in range(2, 6):
                boundary += rng.uniform(0.03, 0.1) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
            spikes = int(rng.integers(5, 11))
            boundary += (
                rng.uniform(0.25, 0.45)
                * np.maximum(0.0, np.cos(spikes * phi + rng.uniform(0, 2 * np.pi))) ** 8
            )
            edge, depth = 0.04, rng.uniform(0.65, 0.85)
        rr = r / boundary
        mask = rr <= 1.0
        inside = _sigmoid((1.0 - rr) / edge)
        internal = 0.7 + 0.6 * _smooth_field(rng, size, 10) if kind == "malignant" else 1.0
        lesion = 1.0 - depth * inside * np.minimum(internal, 1.0)
        # Posterior features: enhancement below benign cysts, shadowing below malignancies.
        below = _sigmoid((yy - cy - ry) / 0.03) * np.exp(-(((xx - cx) / (rx * 0.9)) ** 2))
        posterior = 1.0 + (0.35 if kind == "benign" else -0.4) * below
        tissue = tissue * lesion * posterior
        if kind == "benign":
            rim = np.exp(-(((rr - 1.0) / 0.06) ** 2)) * (yy > cy)
            tissue = tissue * (1.0 + 0.3 * rim)

    img = tissue * _speckle(rng, size) * rng.uniform(190.0, 250.0)
    return np.clip(img, 0, 255).astype(np.uint8), mask.astype(np.uint8)


def generate_dataset(
    root: str,
    n_per_class: int = 40,
    size: int = 128,
    seed: int = 0,
    class_names: Sequence[str] = DEFAULT_CLASSES,
    storage_options: dict | None = None,
) -> str:
    """Write ``<class>/<class> (i).png`` + ``<class> (i)_mask.png`` (0/255) under ``root``.

    ``root`` may be a path or any fsspec URL. Class ``normal`` gets no lesion; any other name
    is drawn as ``benign`` or ``malignant`` if it says so, else by its position (the second
    and later names alternate benign/malignant). Returns ``root``.
    """
    for ci, cls in enumerate(class_names):
        kind = _kind_for(cls, ci)
        for i in range(1, n_per_class + 1):
            rng = np.random.default_rng([seed, ci, i])
            image, mask = make_sample(kind, size, rng)
            base = posixpath.join(root.rstrip("/"), cls, f"{cls} ({i})")
            write_bytes(f"{base}.png", encode_png(image, compress_level=1), storage_options)
            write_bytes(f"{base}_mask.png", encode_mask_png(mask), storage_options)
    return root


def _kind_for(cls: str, index: int) -> str:
    # whole words: "abnormal" is not "normal", nor "non-malignant" "malignant"
    words = re.split(r"[^a-z]+", cls.lower())
    if "non" not in words:
        for kind in DEFAULT_CLASSES:
            if kind in words:
                return kind
    if index == 0:
        return "normal"
    return "benign" if index % 2 == 1 else "malignant"
