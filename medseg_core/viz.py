"""Pictures for reports, drawn with Pillow and numpy only: mask overlays, TP/FP/FN/TN maps,
training curves, montages and confusion matrices, all returned as uint8 RGB arrays."""

from __future__ import annotations

import io
import math
import posixpath
from collections.abc import Mapping, Sequence

import fsspec
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from medseg_core.io import mask_2d

__all__ = [
    "TP_COLOR",
    "FP_COLOR",
    "FN_COLOR",
    "TN_COLOR",
    "PALETTE",
    "to_rgb",
    "overlay",
    "confusion_overlay",
    "plot_curves",
    "montage",
    "confusion_matrix_image",
    "save_png",
]

TP_COLOR = (0, 255, 255)  # cyan
FP_COLOR = (255, 0, 255)  # magenta
FN_COLOR = (255, 255, 0)  # yellow
TN_COLOR = (0, 0, 0)  # black

# Tableau-10 line colours.
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)
_WHITE = (255, 255, 255)
_AXIS = (40, 40, 40)
_GRID = (225, 225, 225)


def _font(size: int = 12) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Any image array -> uint8 HxWx3.

    uint8 is used as is, except 2-D arrays holding only 0/1 (masks) which become 0/255; bool
    becomes 0/255; floats are taken as [0, 1] and scaled; other integer types are scaled from
    their maximum. Grey repeats into three channels, alpha is dropped.
    """
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"expected an HxW or HxWx{{1,3,4}} image, got shape {a.shape}")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        a = np.clip(np.nan_to_num(a, nan=0.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        a = (a.astype(np.float64) * (255.0 / max(float(np.iinfo(a.dtype).max), 1.0))).round()
        a = np.clip(a, 0, 255).astype(np.uint8)
    elif a.ndim == 2 and a.size and a.max() <= 1:
        a = a * np.uint8(255)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def _binary(mask: np.ndarray, name: str) -> np.ndarray:
    return mask_2d(mask, name) > 0


def overlay(image: np.ndarray, mask: np.ndarray, color: Sequence[int] = (255, 0, 0),
            alpha: float = 0.4) -> np.ndarray:
    """Blend ``color`` into the image where ``mask`` is set; other pixels are unchanged.

    Returns uint8 HxWx3. ``mask`` must have the image's height and width.
    """
    rgb = to_rgb(image)
    m = _binary(mask, "mask")
    if m.shape != rgb.shape[:2]:
        raise ValueError(f"mask size {m.shape} does not match image size {rgb.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = rgb.copy()
    blended = (1.0 - alpha) * rgb[m].astype(np.float32) + alpha * np.asarray(color, np.float32)
    out[m] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out


def confusion_overlay(pred: np.ndarray, truth: np.ndarray, *, image: np.ndarray | None = None,
                      alpha: float = 0.5) -> np.ndarray:
    """Colour each pixel by its outcome: TP cyan, FP magenta, FN yellow, TN black.

    With ``image``, the TP/FP/FN colours are blended into it with ``alpha`` and TN pixels show
    the image instead of black.
    """
    p, t = _binary(pred, "pred"), _binary(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"pred size {p.shape} does not match truth size {t.shape}")
    cases = ((p & t, TP_COLOR), (p & ~t, FP_COLOR), (~p & t, FN_COLOR))
    if image is None:
        out = np.zeros((*p.shape, 3), dtype=np.uint8)
        out[:] = TN_COLOR
        for where, colour in cases:
            out[where] = colour
        return out
    out = to_rgb(image)
    if out.shape[:2] != p.shape:
        raise ValueError(f"image size {out.shape[:2]} does not match mask size {p.shape}")
    for where, colour in cases:
        out = overlay(out, where, colour, alpha)
    return out


def _nice_step(span: float, target: int) -> float:
    raw = span / max(target, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    for f in (1.0, 2.0, 2.5, 5.0, 10.0):
        if raw <= f * mag:
            return f * mag
    return 10.0 * mag


def _ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    step = _nice_step(hi - lo, target)
    first = math.ceil(lo / step - 1e-9) * step
    n = int(math.floor((hi - first) / step + 1e-9)) + 1
    return [first + i * step for i in range(max(n, 0))]


def _tick_label(v: float, step: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.2g}"
    # as many decimals as the step has (0.025 needs three, 2.5 one)
    decimals = next(d for d in range(12) if abs(round(step, d) - step) <= 1e-9 * step)
    return f"{v:.{decimals}f}"


def plot_curves(
    history: Mapping[str, Sequence[float]],
    path: str | None = None,
    title: str = "training curves",
    size: tuple[int, int] = (640, 400),
    xlabel: str = "epoch",
    storage_options: dict | None = None,
    first: int = 1,
) -> np.ndarray:
    """Line plot of each series against its index (epoch) counted from ``first``, as uint8
    RGB (H, W, 3).

    Axes with labelled ticks, light grid, one colour per series and a legend. Non-finite values
    break a line (and are left out of the range); empty or all-NaN series appear in the legend
    marked "(no data)". ``size`` is (width, height). With ``path`` the PNG is also written there.
    """
    width, height = size
    img = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(img)
    font, title_font = _font(12), _font(15)

    series = {str(k): np.asarray(list(v), dtype=np.float64).reshape(-1) for k, v in history.items()}
    finite = [s[np.isfinite(s)] for s in series.values()]
    values = np.concatenate(finite) if finite else np.zeros(0)
    n_max = max((len(s) for s in series.values()), default=0)

    tw, th = _text_size(draw, title, title_font)
    draw.text(((width - tw) // 2, 6), title, fill=_AXIS, font=title_font)

    if values.size:
        y_lo, y_hi = float(values.min()), float(values.max())
    else:
        y_lo, y_hi = 0.0, 1.0
    if y_hi - y_lo < 1e-12:
        pad = max(abs(y_hi) * 0.1, 0.5)
        y_lo, y_hi = y_lo - pad, y_hi + pad
    else:
        pad = (y_hi - y_lo) * 0.05
        y_lo, y_hi = y_lo - pad, y_hi + pad
    x_lo, x_hi = (first, first + n_max - 1.0) if n_max > 1 else (first - 0.5, first + 0.5)
    yticks = _ticks(y_lo, y_hi, 6)
    ystep = yticks[1] - yticks[0] if len(yticks) > 1 else 1.0
    xticks = [t for t in _ticks(x_lo, x_hi, 8) if float(t).is_integer()] or [float(first)]
    ylabels = [_tick_label(t, ystep) for t in yticks]

    label_w = max((_text_size(draw, s, font)[0] for s in ylabels), default=0)
    _, char_h = _text_size(draw, "0", font)
    left = label_w + 14
    top = th + 18
    right = width - 12
    bottom = height - (2 * char_h + 22)
    if right - left < 20 or bottom - top < 20:
        raise ValueError(f"plot size {size} is too small")

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)

    for t, label in zip(yticks, ylabels):
        y = py(t)
        draw.line([(left, y), (right, y)], fill=_GRID)
        draw.line([(left - 4, y), (left, y)], fill=_AXIS)
        lw, lh = _text_size(draw, label, font)
        draw.text((left - 6 - lw, y - lh / 2 - 2), label, fill=_AXIS, font=font)
    for t in xticks:
        x = px(t)
        draw.line([(x, bottom), (x, bottom + 4)], fill=_AXIS)
        label = str(int(t))
        lw, _ = _text_size(draw, label, font)
        draw.text((x - lw / 2, bottom + 6), label, fill=_AXIS, font=font)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=_AXIS, width=1)
    xw, _ = _text_size(draw, xlabel, font)
    draw.text(((left + right - xw) / 2, bottom + char_h + 12), xlabel, fill=_AXIS, font=font)

    legend: list[tuple[str, tuple[int, int, int]]] = []
    for i, (name, s) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        ok = np.isfinite(s)
        legend.append((name if ok.any() else f"{name} (no data)", colour))
        points = [(px(j + float(first)), py(float(v))) if ok[j] else None
                  for j, v in enumerate(s)]
        run: list[tuple[float, float]] = []
        for p in [*points, None]:
            if p is not None:
                run.append(p)
                continue
            if len(run) > 1:
                draw.line(run, fill=colour, width=2, joint="curve")
            elif len(run) == 1:  # an isolated point gets a marker so it stays visible
                x, y = run[0]
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            run = []

    if not series or not values.size:
        msg = "no data"
        mw, mh = _text_size(draw, msg, font)
        draw.text(((left + right - mw) / 2, (top + bottom - mh) / 2), msg, fill=_AXIS, font=font)
    if legend:
        row_h = char_h + 8
        box_w = max(_text_size(draw, name, font)[0] for name, _ in legend) + 34
        box_h = row_h * len(legend) + 6
        x0, y0 = right - box_w - 6, top + 6
        draw.rectangle([x0, y0, x0 + box_w, y0 + box_h], fill=_WHITE, outline=_AXIS)
        for k, (name, colour) in enumerate(legend):
            y = y0 + 4 + k * row_h + row_h / 2
            draw.line([(x0 + 6, y), (x0 + 24, y)], fill=colour, width=3)
            draw.text((x0 + 30, y - char_h / 2 - 2), name, fill=_AXIS, font=font)

    out = np.asarray(img, dtype=np.uint8).copy()
    if path is not None:
        save_png(out, path, storage_options=storage_options)
    return out


def _fit(image: np.ndarray, cell: tuple[int, int], background: tuple[int, int, int]) -> np.ndarray:
    """Resize (keeping the aspect ratio) and centre an RGB image in a cell of (h, w)."""
    ch, cw = cell
    h, w = image.shape[:2]
    scale = min(ch / h, cw / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    out = np.empty((ch, cw, 3), dtype=np.uint8)
    out[:] = background
    y, x = (ch - nh) // 2, (cw - nw) // 2
    out[y:y + nh, x:x + nw] = resized
    return out


def montage(
    images: Sequence[np.ndarray],
    ncols: int,
    labels: Sequence[str] | None = None,
    pad: int = 4,
    cell: int | tuple[int, int] | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
) -> np.ndarray:
    """Grid of images as one uint8 RGB array.

    Each image is converted with :func:`to_rgb` (so masks and float maps show) and fitted,
    aspect ratio kept, into a common cell: ``cell`` (h, w) or, by default, the largest height and
    width among the images. ``pad`` pixels separate cells and surround the grid; with ``labels``
    a text strip is added under every cell. Shape: (rows * (cell_h + strip + pad) + pad,
    cols * (cell_w + pad) + pad, 3) with cols = min(ncols, len(images)).
    """
    if not images:
        raise ValueError("montage needs at least one image")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"got {len(labels)} labels for {len(images)} images")
    rgbs = [to_rgb(im) for im in images]
    if cell is None:
        ch, cw = max(a.shape[0] for a in rgbs), max(a.shape[1] for a in rgbs)
    elif isinstance(cell, int):
        ch = cw = cell
    else:
        ch, cw = int(cell[0]), int(cell[1])
    cols = min(ncols, len(rgbs))
    rows = math.ceil(len(rgbs) / cols)
    font = _font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    strip = _text_size(probe, "Ag", font)[1] + 8 if labels is not None else 0
    out_h = rows * (ch + strip + pad) + pad
    out_w = cols * (cw + pad) + pad
    canvas = np.empty((out_h, out_w, 3), dtype=np.uint8)
    canvas[:] = background
    for i, a in enumerate(rgbs):
        r, c = divmod(i, cols)
        y, x = pad + r * (ch + strip + pad), pad + c * (cw + pad)
        canvas[y:y + ch, x:x + cw] = _fit(a, (ch, cw), background)
    if labels is not None:
        img = Image.fromarray(canvas)
        draw = ImageDraw.Draw(img)
        text_colour = tuple(0 if sum(background) > 382 else 255 for _ in range(3))
        for i, label in enumerate(labels):
            r, c = divmod(i, cols)
            y, x = pad + r * (ch + strip + pad) + ch + 3, pad + c * (cw + pad)
            text = str(label)
            while text and _text_size(draw, text, font)[0] > cw and len(text) > 1:
                text = text[:-1]  # clip long labels to the cell width
            draw.text((x + 2, y), text, fill=text_colour, font=font)
        canvas = np.asarray(img).copy()
    return canvas


def confusion_matrix_image(
    matrix: np.ndarray,
    class_names: Sequence[str],
    title: str = "confusion matrix",
    cell: int = 72,
) -> np.ndarray:
    """Confusion matrix (rows = true class, columns = predicted) as uint8 RGB.

    Each cell is shaded from white to blue by its share of the row and shows the count and the
    row percentage.
    """
    m = np.asarray(matrix, dtype=np.float64)
    k = len(class_names)
    if m.shape != (k, k):
        raise ValueError(f"matrix shape {m.shape} does not match {k} class names")
    font, title_font = _font(12), _font(15)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    names = [str(n) for n in class_names]
    name_w = max(_text_size(probe, n, font)[0] for n in names) if names else 0
    _, char_h = _text_size(probe, "Ag", font)
    _, title_h = _text_size(probe, title, title_font)
    left = name_w + 2 * char_h + 20  # row names plus the rotated "true" axis label
    top = title_h + 2 * char_h + 34  # title, "predicted" label and column names
    width = max(left + k * cell + 12, _text_size(probe, title, title_font)[0] + 20)
    height = top + k * cell + 12
    img = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(img)
    tw, _ = _text_size(draw, title, title_font)
    draw.text(((width - tw) // 2, 6), title, fill=_AXIS, font=title_font)
    pw, _ = _text_size(draw, "predicted", font)
    draw.text((left + (k * cell - pw) / 2, title_h + 16), "predicted", fill=_AXIS, font=font)

    tw, th = _text_size(draw, "true", font)
    label = Image.new("RGB", (tw + 4, th + 6), _WHITE)
    ImageDraw.Draw(label).text((2, 0), "true", fill=_AXIS, font=font)
    label = label.rotate(90, expand=True)
    img.paste(label, (4, int(top + (k * cell - label.height) / 2)))

    row_sums = m.sum(axis=1, keepdims=True)
    shares = np.divide(m, row_sums, out=np.zeros_like(m), where=row_sums > 0)
    for j, name in enumerate(names):
        nw, _ = _text_size(draw, name, font)
        draw.text((left + j * cell + (cell - nw) / 2, top - char_h - 8), name, fill=_AXIS, font=font)
    for i, name in enumerate(names):
        nw, nh = _text_size(draw, name, font)
        draw.text((left - nw - 6, top + i * cell + (cell - nh) / 2 - 2), name, fill=_AXIS, font=font)
        for j in range(k):
            s = float(shares[i, j])
            colour = tuple(int(round(255 + s * (c - 255))) for c in (8, 69, 148))
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour, outline=_WHITE)
            count = m[i, j]
            text = f"{int(count)}" if float(count).is_integer() else f"{count:.3g}"
            lines = [text, f"{100 * s:.0f}%"]
            ink = _WHITE if s > 0.5 else _AXIS
            for n_line, line in enumerate(lines):
                lw, _ = _text_size(draw, line, font)
                ly = y0 + cell / 2 - char_h - 2 + n_line * (char_h + 4)
                draw.text((x0 + (cell - lw) / 2, ly), line, fill=ink, font=font)
    return np.asarray(img, dtype=np.uint8).copy()


def save_png(array: np.ndarray, path_or_url: str, storage_options: dict | None = None) -> str:
    """Write an image array as PNG to a path or any fsspec URL; returns the URL.

    uint8 grey (HxW) and RGB/RGBA arrays are written as they are; anything else goes through
    :func:`to_rgb`. Local parent directories are created.
    """
    a = np.asarray(array)
    ok = a.dtype == np.uint8 and (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4)))
    if not ok:
        a = to_rgb(a)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG")
    fs, fs_path = fsspec.core.url_to_fs(path_or_url, **(storage_options or {}))
    parent = posixpath.dirname(fs_path)
    if parent and "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        fs.makedirs(parent, exist_ok=True)
    with fs.open(fs_path, "wb") as f:
        f.write(buf.getvalue())
    return path_or_url
