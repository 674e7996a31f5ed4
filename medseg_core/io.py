"""Bytes <-> arrays: image and mask decoding, PNG and RLE encoding, fsspec reads and writes.

Decoding rules (what every reader in medseg gets):
- Output is uint8, HxWxC with C = 1 or 3 for images, HxW in {0, 1} for masks.
- Alpha is dropped, not composited: the stored colour values are the measurement, and
  compositing onto a background would change them wherever alpha < 255.
- 16-bit images are scaled by their dtype range (x * 255 / 65535), never clipped. Mode ``I``
  (32-bit int) holding values in [0, 65535] is treated as 16-bit (that is how some readers
  expose 16-bit PNG and TIFF), values in [-32768, 32767] with one below 0 as signed 16-bit
  (CT-style TIFFs, scaled by the int16 range); wider values are scaled by the int32 range. Mode ``F`` (float)
  in [0, 1] is scaled by 255; any other float range is min-max scaled per image.
- Colour to grey uses ITU-R 601 luma (as Pillow's ``convert("L")``); grey to colour repeats.
- Pixel count is checked from the header before any pixel is decoded (decompression bombs);
  Pillow's own ``DecompressionBombError`` is reported as ``ImageTooLargeError`` too.
"""

from __future__ import annotations

import errno
import glob
import io
import os
import posixpath
import stat
import struct
import warnings
from collections.abc import Mapping, Sequence
from typing import BinaryIO

import fsspec
import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000
# bound on a file read whole (image, mask, list): 40 Mpx of uncompressed 16-bit RGBA is 320 MB
DEFAULT_MAX_BYTES = 384 * 2**20
# tile-mode bound on a segmenter's work for one image: a whole-slide-sized image at the default
# pixel limit, tiles and their overlap included (1.78x for a 25 % overlap) with room to spare
MAX_TILE_WORK_PIXELS = 4 * DEFAULT_MAX_PIXELS
# Pillow refuses to open anything larger (DecompressionBombError), whatever our own limit says
PILLOW_MAX_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)

# Pillow plugins allowed to parse untrusted bytes. Formats like EPS (which runs Ghostscript)
# are deliberately left out. Multi-picture camera JPEGs (MPO) come through the JPEG plugin.
Image.init()
DECODE_FORMATS = tuple(
    f for f in ("PNG", "JPEG", "BMP", "DIB", "TIFF", "GIF", "WEBP", "PPM") if f in Image.OPEN
)
# file name extensions of those formats (lower case, with the dot)
DECODE_EXTENSIONS = tuple(sorted(e for e, f in Image.registered_extensions().items()
                                 if f in DECODE_FORMATS))



class ImageDecodeError(ValueError):
    """The bytes are not a readable image (empty, truncated, unknown format); names the file."""


class ImageTooLargeError(ImageDecodeError):
    """The image header declares more pixels than allowed (decompression-bomb guard), or the
    file has more bytes than a reader allows."""


# what Pillow raises on malformed files: besides OSError and the like, a field of the wrong type
# in a TIFF directory (TypeError), short structs, missing table entries
_MALFORMED = (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, KeyError,
              struct.error, ZeroDivisionError)


def _open(data: bytes | BinaryIO, name: str) -> Image.Image:
    """Open (parse the header only) with the allowed format plugins, mapping errors."""
    if isinstance(data, bytes | bytearray | memoryview):
        if len(data) == 0:
            raise ImageDecodeError(f"{name}: empty file (0 bytes), not an image")
        fp: BinaryIO = io.BytesIO(data)
    else:
        fp = data
    try:
        with warnings.catch_warnings():
            # We apply our own pixel cap; Pillow's warning threshold is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp, formats=DECODE_FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: image too large to decode ({e})") from e
    except UnidentifiedImageError as e:
        formats = "/".join(f for f in DECODE_FORMATS if f != "DIB")
        raise ImageDecodeError(f"{name}: not a recognised image ({formats})") from e
    except _MALFORMED as e:
        raise ImageDecodeError(f"{name}: cannot read image header: {e}") from e


def _check_pixels(im: Image.Image, max_pixels: int | None, name: str) -> None:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"{name}: image has an empty size {w}x{h}")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLargeError(
            f"{name}: image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}"
        )


def _load(data: bytes | BinaryIO, max_pixels: int | None, name: str) -> Image.Image:
    im = _open(data, name)
    _check_pixels(im, max_pixels, name)
    return _decode(im, name)


# Pillow (13) turns a TIFF by its Orientation tag as it loads it, and no other format: these
# undo each turn, so that every format decodes in stored order and reports the tag alike
# (`exif_orientation`)
_UNDO_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                     4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                     6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
                     8: Image.Transpose.ROTATE_270}


def _tiff_orientation(im: Image.Image) -> int | None:
    if im.format != "TIFF":
        return None
    value = getattr(im, "tag_v2", {}).get(0x0112)
    return value if isinstance(value, int) and value in _UNDO_ORIENTATION else None


def _stored_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) as stored: Pillow reports a TIFF's turned size before loading it."""
    w, h = im.size
    return (h, w) if (_tiff_orientation(im) or 0) >= 5 else (w, h)


def _decode(im: Image.Image, name: str) -> Image.Image:
    orientation = _tiff_orientation(im)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: image too large to decode ({e})") from e
    except _MALFORMED as e:
        raise ImageDecodeError(f"{name}: cannot decode image (truncated or corrupt): {e}") from e
    if orientation is not None and _tiff_orientation(im) is None:  # turned while loading
        im = im.transpose(_UNDO_ORIENTATION[orientation])
    return im


def _scale16(a: np.ndarray) -> np.ndarray:
    """uint16 range -> uint8, rounding x * 255 / 65535."""
    return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _to_uint8(im: Image.Image) -> np.ndarray:
    """Pixels as uint8, HxW (grey) or HxWx3 (colour); alpha dropped."""
    mode = im.mode
    if mode == "L":
        return np.asarray(im)
    if mode == "1":
        return np.asarray(im.convert("L"))
    if mode in ("LA", "La"):
        return np.asarray(im.getchannel(0))
    if mode.startswith("I;16"):
        return _scale16(np.asarray(im))
    # I and F in place, in their own 4 bytes a pixel: float64 copies took a 40 Mpx float TIFF
    # of a few hundred KB to 0.8 GB while decoding
    if mode == "I":
        a = np.asarray(im)
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo >= 0 and hi <= 65535:
            return _scale16(a)
        if lo >= -32768 and hi <= 32767:
            # Pillow opens signed 16-bit TIFFs as mode I: by the int32 range every value of
            # such an image fell on one grey level
            return _scale16(a + 32768)
        return ((a.astype(np.int64) + 2**31) * 255 // (2**32 - 1)).astype(np.uint8)
    if mode == "F":
        a = np.array(im, dtype=np.float32)
        np.nan_to_num(a, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 1.0)
        if not (lo >= 0.0 and hi <= 1.0):
            with np.errstate(over="ignore"):
                fits = bool(np.isfinite(np.float32(hi) - np.float32(lo)))
            if hi > lo and fits:
                a -= np.float32(lo)
                a *= np.float32(255.0 / (hi - lo))
                np.clip(a, 0.0, 255.0, out=a)
            elif hi > lo:  # a range beyond float32's (values near +-3.4e38)
                a = ((a.astype(np.float64) - lo) * (255.0 / (hi - lo))).astype(np.float32)
            else:
                a[...] = 0.0
        else:
            a *= np.float32(255.0)
        return np.rint(a, out=a).astype(np.uint8)
    if mode == "RGB":
        return np.asarray(im)
    if mode == "RGBA":
        return np.asarray(im)[..., :3]
    # P, PA, CMYK, YCbCr, LAB, HSV, RGBX, RGBa, I;16 variants Pillow may add...
    return np.asarray(im.convert("RGB"))


def rgb_to_grey(rgb: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> HxW grey by PIL's ITU-R 601-2 luma, the one RGB-to-grey of the project
    (decoding with one channel and ``transforms.to_channels`` must give the same pixels)."""
    return np.array(Image.fromarray(np.ascontiguousarray(rgb), "RGB").convert("L"))


def _to_channels(a: np.ndarray, channels: int) -> np.ndarray:
    """HxW or HxWx3 uint8 -> a fresh, writable HxWxC array."""
    if a.ndim == 2:
        a = a[:, :, None]
    if channels == 1:
        if a.shape[2] == 1:
            return np.array(a, copy=True)
        return rgb_to_grey(a)[:, :, None]
    if a.shape[2] == 1:
        return np.repeat(a, 3, axis=2)
    return np.array(a, copy=True)


def decode_image(
    data: bytes,
    channels: int = 3,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    name: str = "<bytes>",
    draft: tuple[int, int] | None = None,
    keep_grey: bool = False,
) -> np.ndarray:
    """Decode image bytes of any mode into uint8 HxWxC (C = ``channels``, 1 or 3).

    ``draft`` (width, height) lets JPEG decoders downscale by a power of two while decoding,
    to no less than that size (fast thumbnails for hashing); other formats ignore it.
    ``keep_grey``: a grey source stays one plane (HxWx1) even when ``channels`` is 3, for a
    caller that resizes and augments first and repeats the plane last
    (``transforms.to_channels``): the same pixels for a third of the work.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    im = _open(data, name)
    _check_pixels(im, max_pixels, name)
    if draft is not None and im.format in ("JPEG", "MPO"):
        im.draft(im.mode, draft)
    pixels = _to_uint8(_decode(im, name))
    return _to_channels(pixels, 1 if keep_grey and pixels.ndim == 2 else channels)


def decode_mask(
    data: bytes,
    *,
    threshold: int = 127,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    name: str = "<bytes>",
) -> np.ndarray:
    """Decode a mask into uint8 HxW in {0, 1}: pixel > ``threshold`` after conversion to 8 bit.

    Colour masks use the maximum over channels (so a pure red or blue outline counts as
    foreground, which luma would not); 16-bit masks are scaled first, as images are. A mask
    whose colour is one value everywhere and whose alpha is not (an overlay exported as
    "opaque where the lesion is") is read from its alpha.
    """
    im = _load(data, max_pixels, name)
    a = _to_uint8(im)
    if a.ndim == 3:
        a = a.max(axis=2)
    if "A" in im.getbands() and a.size and a.min() == a.max():
        alpha = np.asarray(im.getchannel("A"))
        if alpha.min() != alpha.max():
            a = alpha
    mask = (a > threshold).astype(np.uint8)
    if not mask.any() and (a.any() or (len(im.getbands()) == 1 and im.getextrema()[1])):
        _warn_faint_mask(name, threshold)
    return mask


_faint_mask_warned = False


def _warn_faint_mask(name: str, threshold: int) -> None:
    """Once per process: a mask with foreground pixels that all fall at or below the threshold
    decodes empty, which is what 0/1-valued masks do at the default threshold (silently, they
    would train a model to predict nothing)."""
    global _faint_mask_warned
    if not _faint_mask_warned:
        _faint_mask_warned = True
        warnings.warn(f"{name}: the mask has nonzero pixels but none above the threshold "
                      f"{threshold} (8-bit scale), so it decodes empty; masks stored as 0/1 "
                      "need data.mask_threshold=0 (16-bit 0/1 masks: re-save them as 8-bit "
                      "0/255)", UserWarning, stacklevel=3)


def exif_orientation(data: bytes | BinaryIO, name: str = "<bytes>") -> int | None:
    """The EXIF orientation tag (2-8) of an image that viewers show turned or mirrored; None
    without one (or 1). Decoding never applies it: pixels are taken in stored order."""
    im = _open(data, name)
    if im.format == "PNG" and "exif" not in im.info:
        # Pillow decodes the whole image to look for an eXIf chunk after the pixels: the cost
        # of a second decode on every request, for a tag that belongs before them
        return None
    try:
        value = im.getexif().get(0x0112)
    except Exception:  # a garbled EXIF block: no tag to go by, the pixels decode regardless
        return None
    return int(value) if isinstance(value, int) and 2 <= value <= 8 else None


def image_size(data: bytes | BinaryIO, name: str = "<bytes>") -> tuple[int, int]:
    """(width, height) from the header only; ``data`` may be bytes or an open binary file.

    Sizes beyond Pillow's hard limit (2 x ``Image.MAX_IMAGE_PIXELS``) raise ImageTooLargeError.
    """
    return _stored_size(_open(data, name))


def check_url_credentials(url: str, setting: str) -> None:
    """Refuse a URL that carries a user name or password (``scheme://user:pass@host/...``),
    naming ``setting``. medseg takes credentials only from the environment: a URL's would be
    echoed in logs, reports, bundle listings and error messages. The message masks them."""
    scheme, sep, rest = str(url).partition("://")
    if not sep:
        return
    netloc = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if "@" not in netloc:
        return
    path = rest[len(netloc):].split("?", 1)[0].split("#", 1)[0]
    masked = f"{scheme}://***@{netloc.rpartition('@')[2]}{path[:60]}"
    raise ValueError(
        f"{setting}: the URL carries credentials ({masked}); they must not be in the settings, "
        "where they would be logged. Give them through the environment: for S3 "
        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile or role), for an HTTP server a "
        "~/.netrc entry (or $NETRC), read with client_kwargs.trust_env=true in the storage options")


def object_fs(uri: str, storage_options: dict | None = None
              ) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of one file or object, its URI taken literally. fsspec's URL
    parsing reads ``::`` as a chain of filesystems, and a file's name may hold it:
    ``/data/a::b.png`` would read ``/data/a``, and ``s3://bucket/a::b.png`` built a broken S3
    filesystem that the bulk job's reader then kept for every later read."""
    protocol, sep, _ = uri.partition("://")
    cls = fsspec.get_filesystem_class(protocol if sep else "file")
    fs = cls(**{**cls._get_kwargs_from_urls(uri), **(storage_options or {})})
    return fs, fs._strip_protocol(uri)


def read_image_size(uri: str, storage_options: dict | None = None) -> tuple[int, int]:
    """(width, height) of the image at ``uri``, reading only the first blocks of the file."""
    fs, path = object_fs(uri, storage_options)
    with fs.open(path, "rb", block_size=2**16) as f:
        return image_size(f, name=uri)


def read_limited(fs: fsspec.AbstractFileSystem, path: str,
                 max_bytes: int | None = DEFAULT_MAX_BYTES, name: str | None = None) -> bytes:
    """All bytes of ``path`` on ``fs``, never more than ``max_bytes`` (None: no limit) in memory.

    A larger file raises ``ImageTooLargeError``. A local file is ``stat``-ed first: one that is
    not a regular file (a FIFO would block for ever, a device never end) raises
    ``ImageDecodeError`` unopened, one that is too large is refused unread. Elsewhere (object
    storage) one ranged read of at most ``max_bytes + 1`` bytes tells (an empty object, whose
    ranged read the server refuses, costs one more request for its size).
    """
    name = name or path
    if is_local(fs):
        try:
            st = os.stat(path)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise ImageDecodeError(f"{name}: a loop of symbolic links") from exc
        if not stat.S_ISREG(st.st_mode):
            raise ImageDecodeError(f"{name}: not a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise ImageTooLargeError(f"{name}: {st.st_size} bytes, more than max_bytes "
                                     f"({max_bytes})")
        with open(path, "rb") as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    elif max_bytes is None:
        data = fs.cat_file(path)
    else:
        try:
            data = fs.cat_file(path, start=0, end=max_bytes + 1)
        except FileNotFoundError:
            raise
        except Exception:
            # S3 and HTTP servers answer a ranged GET of an empty object with 416 (s3fs raises
            # OSError, fsspec's HTTP aiohttp's ClientResponseError): an empty file, which
            # decoding reports as such
            try:
                empty = fs.size(path) == 0
            except Exception:
                empty = False
            if not empty:
                raise
            data = b""
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLargeError(f"{name}: more than max_bytes ({max_bytes} bytes)")
    return data


def read_bytes(uri: str, storage_options: dict | None = None,
               max_bytes: int | None = DEFAULT_MAX_BYTES) -> bytes:
    """All bytes of ``uri`` (plain path, ``file://``, ``s3://``, any fsspec URL), bounded as
    ``read_limited``."""
    fs, path = object_fs(uri, storage_options)
    return read_limited(fs, path, max_bytes, uri)


def write_bytes(uri: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write ``data`` to ``uri``, creating parent directories on local filesystems."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if is_local(fs):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def remove_path(fs: fsspec.AbstractFileSystem, path: str | Sequence[str],
                recursive: bool = False) -> None:
    """``fs.rm(path, recursive)`` (one path or a list) with each path taken literally.
    fsspec's object stores read ``*``, ``?`` and ``[`` in a path as a glob: on S3, removing
    ``out/pk*x`` removed every folder whose name matched, and ``out/scan[1]`` matched nothing
    and failed. Such a path is removed file by file from a prefix listing instead; the others
    still go in one bulk request (the local filesystem never globs here)."""
    paths = [path] if isinstance(path, str) else list(path)
    if is_local(fs):
        fs.rm(paths, recursive=recursive)
        return
    plain = [p for p in paths if not glob.has_magic(p)]
    if plain:
        fs.rm(plain[0] if len(plain) == 1 else plain, recursive=recursive)
    for p in paths:
        if glob.has_magic(p):
            # as fs.rm does: folders too (stores with real folders, such as SeaweedFS, keep
            # them), each after what it holds
            names = {p, *fs.find(p, withdirs=True)} if recursive else {p}
            for name in sorted(names, reverse=True):
                fs.rm_file(name)
            fs.invalidate_cache(p)


def move_file(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """``fs.mv`` of one file with both names taken literally (see ``remove_path``)."""
    if is_local(fs):
        os.replace(src, dst)
        return
    fs.cp_file(src, dst)
    fs.rm_file(src)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local disk (fsspec's protocol is a name or a tuple of names)."""
    p = fs.protocol
    return "file" in ((p,) if isinstance(p, str) else tuple(p))


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
    """Encode uint8 HxW, HxWx1, HxWx3 or HxWx4 (or uint16 HxW as 16-bit grey) to PNG.

    Bool arrays are written as 0/255 grey.
    """
    a = np.asarray(array)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.dtype == np.uint16 and a.ndim == 2:
        im = Image.fromarray(a)
    elif a.dtype == np.uint8 and (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        im = Image.fromarray(a)
    else:
        raise ValueError(f"cannot encode array of shape {a.shape} and dtype {a.dtype} as PNG")
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def mask_2d(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    """`mask` as an HxW array (an HxWx1 one loses its last axis); anything else is a ValueError."""
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[2] == 1:
        m = m[:, :, 0]
    if m.ndim != 2:
        raise ValueError(f"{name} must be HxW, got shape {m.shape}")
    return m


def encode_mask_png(mask: np.ndarray) -> bytes:
    """Encode a mask (HxW or HxWx1, nonzero = foreground) as a 0/255 8-bit grey PNG."""
    m = mask_2d(mask)
    return encode_png((m != 0).astype(np.uint8) * 255)


def rle_encode(mask: np.ndarray, compressed: bool = False) -> dict:
    """COCO RLE of a binary mask: ``{"size": [h, w], "counts": [...]}``.

    Column-major runs, starting with the number of zeros (0 when the first pixel is set).
    ``compressed=True`` gives COCO's compact string form of ``counts`` instead of a list.
    """
    m = mask_2d(mask)
    h, w = m.shape
    flat = m.ravel(order="F") != 0
    if flat.size == 0:
        counts: list[int] = []
    else:
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        bounds = np.concatenate([[0], change, [flat.size]])
        counts = np.diff(bounds).tolist()
        if flat[0]:
            counts = [0, *counts]
    return {"size": [int(h), int(w)], "counts": _counts_to_string(counts) if compressed else counts}


def rle_decode(rle: Mapping, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Inverse of :func:`rle_encode` (list or compressed-string counts) -> uint8 HxW {0, 1}.
    A few bytes of RLE can describe any size, so ``size`` is checked against ``max_pixels``
    (`ImageTooLargeError`) before anything is allocated."""
    h, w = (int(v) for v in rle["size"])
    if h < 0 or w < 0:
        raise ValueError(f"RLE size must not be negative, got {h}x{w}")
    if max_pixels is not None and h * w > max_pixels:
        raise ImageTooLargeError(f"RLE mask of {h}x{w} = {h * w} pixels exceeds the limit of "
                                 f"{max_pixels}")
    counts = rle["counts"]
    if isinstance(counts, bytes | str):
        counts = _counts_from_string(counts)
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any() or int(counts.sum()) != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected {h}*{w} = {h * w}")
    values = (np.arange(counts.size) % 2).astype(np.uint8)
    flat = np.repeat(values, counts)
    return np.ascontiguousarray(flat.reshape((w, h)).T)


def _counts_to_string(counts: Sequence[int]) -> str:
    # COCO maskApi rleToString: deltas against counts[i-2] for i > 2, 5-bit groups, LEB-like.
    out = []
    for i, c in enumerate(counts):
        x = int(c) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = (x != -1) if (ch & 0x10) else (x != 0)
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return "".join(out)


def _counts_from_string(s: str | bytes) -> list[int]:
    data = s.encode("ascii") if isinstance(s, str) else s
    counts: list[int] = []
    p = 0
    while p < len(data):
        x = 0
        k = 0
        more = True
        while more:
            if p >= len(data):
                raise ValueError("truncated compressed RLE string")
            ch = data[p] - 48
            x |= (ch & 0x1F) << (5 * k)
            more = bool(ch & 0x20)
            p += 1
            k += 1
            if not more and (ch & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts
