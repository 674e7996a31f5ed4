"""medseg_core.io: decoding every mode, error naming, bomb cap, PNG/RLE encoders, fsspec I/O."""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib

import fsspec
import numpy as np
import pytest
from PIL import Image

from medseg_core.io import (
    ImageDecodeError,
    ImageTooLargeError,
    decode_image,
    decode_mask,
    encode_mask_png,
    encode_png,
    exif_orientation,
    image_size,
    read_bytes,
    read_image_size,
    rle_decode,
    rle_encode,
    write_bytes,
)

RNG = np.random.default_rng(0)
GREY = RNG.integers(0, 256, (9, 13), dtype=np.uint8)
RGB = RNG.integers(0, 256, (9, 13, 3), dtype=np.uint8)


def save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def luma(rgb: np.ndarray) -> np.ndarray:
    """Pillow's own RGB -> L conversion, as the reference for grey output."""
    return np.asarray(Image.fromarray(rgb).convert("L"))


def scaled16(a: np.ndarray) -> np.ndarray:
    return np.rint(a.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# decode_image: every mode


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_grey_lossless_formats(fmt):
    data = save(Image.fromarray(GREY), fmt)
    one = decode_image(data, 1)
    three = decode_image(data, 3)
    assert one.shape == (9, 13, 1) and one.dtype == np.uint8
    assert three.shape == (9, 13, 3)
    np.testing.assert_array_equal(one[:, :, 0], GREY)
    for c in range(3):
        np.testing.assert_array_equal(three[:, :, c], GREY)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_rgb_lossless_formats(fmt):
    data = save(Image.fromarray(RGB), fmt)
    np.testing.assert_array_equal(decode_image(data, 3), RGB)
    np.testing.assert_array_equal(decode_image(data, 1)[:, :, 0], luma(RGB))


def test_decoding_to_grey_equals_converting_the_decoded_rgb():
    """Decoding with one channel (the batch and serving readers) and `transforms.to_channels`
    (the training transforms) must give the same grey, to the last unit, on every colour."""
    from medseg_core.transforms import to_channels

    rgb = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    grey = decode_image(save(Image.fromarray(rgb), "PNG"), 1)
    np.testing.assert_array_equal(grey, to_channels(rgb, 1))
    np.testing.assert_array_equal(grey[:, :, 0], luma(rgb))


def test_rgba_drops_alpha_keeping_stored_colour():
    alpha = RNG.integers(0, 256, (9, 13), dtype=np.uint8)
    alpha[0, 0] = 0  # fully transparent pixel keeps its colour (no compositing)
    rgba = np.dstack([RGB, alpha])
    data = save(Image.fromarray(rgba), "PNG")
    np.testing.assert_array_equal(decode_image(data, 3), RGB)
    np.testing.assert_array_equal(decode_image(data, 1)[:, :, 0], luma(RGB))


def test_la_drops_alpha():
    la = Image.fromarray(np.dstack([GREY, np.zeros_like(GREY)]))
    assert la.mode == "LA"
    np.testing.assert_array_equal(decode_image(save(la, "PNG"), 1)[:, :, 0], GREY)


@pytest.mark.parametrize("transparency", [False, True])
def test_palette(transparency):
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    index = RNG.integers(0, 256, (9, 13), dtype=np.uint8)
    p = Image.new("P", (13, 9))
    p.putpalette(palette.ravel().tolist())
    p.putdata(index.ravel().tolist())
    kw = {"transparency": 3} if transparency else {}
    data = save(p, "PNG", **kw)
    assert Image.open(io.BytesIO(data)).mode == "P"
    np.testing.assert_array_equal(decode_image(data, 3), palette[index])


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_scaled_by_dtype_range_not_clipped(fmt):
    a = RNG.integers(0, 65536, (9, 13), dtype=np.uint16)
    a[0, :4] = [0, 256, 32768, 65535]
    data = save(Image.fromarray(a), fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = decode_image(data, 1)[:, :, 0]
    np.testing.assert_array_equal(out, scaled16(a))
    assert out[0, :4].tolist() == [0, 1, 128, 255]


def test_mode_I_in_16bit_range_scaled_like_16bit():
    a = RNG.integers(0, 65536, (9, 13)).astype(np.int32)
    data = save(Image.fromarray(a), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    np.testing.assert_array_equal(decode_image(data, 1)[:, :, 0], scaled16(a))


def _signed16_tiff(a: np.ndarray) -> bytes:
    """A grey TIFF of signed 16-bit samples (SampleFormat 2), as CT exports write them."""
    h, w = a.shape
    pixels = a.astype("<i2").tobytes()
    tags = [(256, w), (257, h), (258, 16), (259, 1), (262, 1), (273, None), (277, 1), (278, h),
            (279, len(pixels)), (339, 2)]
    offset = 8 + 2 + 12 * len(tags) + 4
    ifd = b"".join(struct.pack("<HHII", tag, 4, 1, offset if value is None else value)
                   for tag, value in tags)
    return b"II*\x00" + struct.pack("<IH", 8, len(tags)) + ifd + b"\0\0\0\0" + pixels


def test_signed_16bit_scaled_by_the_int16_range():
    a = np.array([[-1000, -500, 0, 500], [1000, 2000, 3000, -32768]], dtype=np.int16)
    data = _signed16_tiff(a)
    assert Image.open(io.BytesIO(data)).mode == "I"
    out = decode_image(data, 1)[:, :, 0]
    np.testing.assert_array_equal(out, scaled16(a.astype(np.int32) + 32768))
    assert len(np.unique(out[0])) == 4
    ramp = np.linspace(0, 30000, 16).astype(np.int16).reshape(2, 8)
    ramp[0, 0] = -1   # one negative pixel no longer flattens the rest
    assert len(np.unique(decode_image(_signed16_tiff(ramp), 1))) == 16


def test_mode_I_wide_range_uses_int32_range():
    a = np.array([[-(2**31), 0, 2**31 - 1]], dtype=np.int32)
    out = decode_image(save(Image.fromarray(a), "TIFF"), 1)[0, :, 0]
    assert out[0] == 0 and out[2] == 255 and 126 <= out[1] <= 128


def test_float_unit_range_and_arbitrary_range():
    unit = RNG.random((9, 13)).astype(np.float32)
    out = decode_image(save(Image.fromarray(unit), "TIFF"), 1)[:, :, 0]
    np.testing.assert_array_equal(out, np.rint(unit.astype(np.float64) * 255).astype(np.uint8))
    wide = (unit * 15 - 5).astype(np.float32)
    out = decode_image(save(Image.fromarray(wide), "TIFF"), 1)[:, :, 0]
    assert out.min() == 0 and out.max() == 255
    # monotonic: ordering of pixels is preserved
    order = np.argsort(wide.ravel(), kind="stable")
    assert (np.diff(out.ravel()[order].astype(int)) >= 0).all()
    # a range wider than float32 holds (no-data at -FLT_MAX, say): still 0 .. 255
    extreme = np.array([[-3.4e38, 0.0], [1.0, 3.4e38]], np.float32)
    out = decode_image(save(Image.fromarray(extreme), "TIFF"), 1)[:, :, 0]
    assert out.tolist() == [[0, 128], [128, 255]]


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_one_bit(fmt):
    bits = RNG.random((9, 13)) > 0.5
    im = Image.fromarray(bits.astype(np.uint8) * 255).convert("1")
    out = decode_image(save(im, fmt), 1)[:, :, 0]
    np.testing.assert_array_equal(out, bits.astype(np.uint8) * 255)


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
def test_jpeg(mode):
    yy, xx = np.mgrid[0:32, 0:48]
    smooth = np.dstack([xx * 5, yy * 7, (xx + yy) * 3]).astype(np.uint8)
    im = Image.fromarray(smooth)
    ref = smooth if mode == "RGB" else np.asarray(im.convert(mode).convert("RGB"))
    if mode == "L":
        ref = np.repeat(luma(smooth)[:, :, None], 3, axis=2)
    data = save(im.convert(mode), "JPEG", quality=95)
    out = decode_image(data, 3)
    assert out.shape == (32, 48, 3)
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 4


def test_jpeg_draft_downscales_but_other_formats_ignore_it():
    big = Image.fromarray(RNG.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    out = decode_image(save(big, "JPEG"), 1, draft=(64, 64))
    assert 64 <= out.shape[0] < 512
    out = decode_image(save(big, "PNG"), 1, draft=(64, 64))
    assert out.shape[:2] == (512, 512)


@pytest.mark.parametrize("source", [GREY, RGB], ids=["L", "RGB"])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_is_writable(source, channels):
    out = decode_image(save(Image.fromarray(source), "PNG"), channels)
    assert out.flags.writeable and out.flags.c_contiguous
    out[0, 0, 0] = 7  # transforms may work in place


@pytest.mark.parametrize("channels", [1, 3])
def test_keep_grey_leaves_a_grey_source_one_plane(channels):
    grey = decode_image(save(Image.fromarray(GREY), "PNG"), channels, keep_grey=True)
    assert grey.shape == (*GREY.shape, 1) and grey.flags.writeable
    np.testing.assert_array_equal(grey[:, :, 0], GREY)
    # a colour source is converted as asked either way
    data = save(Image.fromarray(RGB), "PNG")
    np.testing.assert_array_equal(decode_image(data, channels, keep_grey=True),
                                  decode_image(data, channels))


def test_bad_channels():
    with pytest.raises(ValueError):
        decode_image(save(Image.fromarray(GREY), "PNG"), 2)


# ----------------------------------------------------------------------------------------------
# decode_mask


def test_mask_threshold():
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    data = save(Image.fromarray(ramp), "PNG")
    m = decode_mask(data)
    assert m.dtype == np.uint8 and m.shape == (16, 16)
    np.testing.assert_array_equal(m, (ramp > 127).astype(np.uint8))
    np.testing.assert_array_equal(decode_mask(data, threshold=0), (ramp > 0).astype(np.uint8))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_a_mask_of_zeros_and_ones_warns_that_it_decodes_empty(monkeypatch, dtype):
    import medseg_core.io as mio

    monkeypatch.setattr(mio, "_faint_mask_warned", False)
    ones = np.zeros((8, 8), dtype)
    ones[2:5, 3:6] = 1
    with pytest.warns(UserWarning, match="m.png: the mask has nonzero pixels but none above"):
        assert not decode_mask(save(Image.fromarray(ones), "PNG"), name="m.png").any()
    if dtype == np.uint8:  # the remedy the warning names
        assert decode_mask(save(Image.fromarray(ones), "PNG"), threshold=0).sum() == 9
    with warnings.catch_warnings():  # an empty mask, and a 0/255 one, are not suspicious
        warnings.simplefilter("error")
        monkeypatch.setattr(mio, "_faint_mask_warned", False)
        assert not decode_mask(save(Image.fromarray(np.zeros((8, 8), dtype)), "PNG")).any()
        assert decode_mask(save(Image.fromarray((ones > 0).astype(np.uint8) * 255), "PNG")).any()


def test_mask_16bit_scaled_before_threshold():
    a = np.array([[30000, 40000, 0, 65535]], dtype=np.uint16)  # -> 117, 156, 0, 255
    m = decode_mask(save(Image.fromarray(a), "PNG"))
    assert m.tolist() == [[0, 1, 0, 1]]


def test_colour_mask_uses_max_over_channels():
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 2] = (0, 0, 200)
    m = decode_mask(save(Image.fromarray(rgb), "PNG"))
    assert m.tolist() == [[1, 0, 0], [0, 0, 1]]


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_a_mask_drawn_only_in_alpha_is_read_from_its_alpha(mode):
    lesion = np.zeros((6, 7), dtype=np.uint8)
    lesion[2:4, 1:4] = 255
    colour = np.full((6, 7, 3 if mode == "RGBA" else 1), 255, dtype=np.uint8)
    overlay = Image.fromarray(np.dstack([colour, lesion]), mode)
    np.testing.assert_array_equal(decode_mask(save(overlay, "PNG")), lesion // 255)
    # where the colour varies, it is the mask and alpha is dropped as for images
    colour[...] = lesion[..., None]
    coloured = Image.fromarray(np.dstack([colour, 255 - lesion]), mode)
    np.testing.assert_array_equal(decode_mask(save(coloured, "PNG")), lesion // 255)


# ----------------------------------------------------------------------------------------------
# errors name the file


def test_zero_bytes_names_file():
    with pytest.raises(ImageDecodeError, match=re.escape("s3://b/empty (1).png")):
        decode_image(b"", name="s3://b/empty (1).png")
    with pytest.raises(ImageDecodeError, match="empty.png"):
        decode_mask(b"", name="empty.png")


def test_non_image_names_file():
    with pytest.raises(ImageDecodeError, match=re.escape("/data/notes.png")):
        decode_image(b"this is a text file, not an image", name="/data/notes.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF"])
def test_truncated_names_file(fmt):
    noisy = Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = save(noisy, fmt)
    cut = data[: len(data) // 2]
    with pytest.raises(ImageDecodeError, match=re.escape("cut.img")):
        decode_image(cut, name="cut.img")


@pytest.mark.parametrize("field_type", [5, 7, 11])  # RATIONAL, UNDEFINED, FLOAT
def test_a_tiff_field_of_the_wrong_type_is_a_decode_error_naming_the_file(field_type):
    """Pillow raises TypeError for a StripOffsets entry that is no integer (found by fuzzing the
    serving endpoint, which answered 500; a read task would have failed its whole job)."""
    data = bytearray(save(Image.fromarray(np.zeros((20, 24), np.uint8)), "TIFF"))
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack_from("<H", data, entry)[0] == 273:  # StripOffsets
            struct.pack_into("<H", data, entry + 2, field_type)
    with pytest.raises(ImageDecodeError, match=r"odd\.tif: cannot decode image"):
        decode_image(bytes(data), name="odd.tif")


def test_errors_are_value_errors():
    assert issubclass(ImageDecodeError, ValueError)
    assert issubclass(ImageTooLargeError, ImageDecodeError)


# ----------------------------------------------------------------------------------------------
# decompression bombs


def _chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` whose pixel data is a few bytes: far too short."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def test_pixel_cap():
    data = save(Image.fromarray(GREY), "PNG")  # 13 x 9 = 117 pixels
    assert decode_image(data, 1, max_pixels=117).shape == (9, 13, 1)
    with pytest.raises(ImageTooLargeError, match=r"cap\.png.*13x9"):
        decode_image(data, 1, max_pixels=116, name="cap.png")
    with pytest.raises(ImageTooLargeError):
        decode_mask(data, max_pixels=100)


def test_cap_checked_from_header_before_decoding():
    # No pixel data: decoding would fail with a truncation error; the cap must fire first.
    data = png_header_only(12_000, 10_000)  # over our default cap, under Pillow's hard limit
    assert image_size(data) == (12_000, 10_000)
    with pytest.raises(ImageTooLargeError, match="bomb.png"):
        decode_image(data, name="bomb.png")
    with pytest.raises(ImageTooLargeError, match="bomb.png"):
        decode_image(data, max_pixels=10_000_000, name="bomb.png")
    small = png_header_only(10, 10)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(small, max_pixels=10_000_000, name="small.png")
    assert not isinstance(info.value, ImageTooLargeError)


def test_pillow_bomb_error_is_reported_as_too_large():
    # Beyond Pillow's own hard limit (2 x MAX_IMAGE_PIXELS) even with our cap disabled.
    limit = Image.MAX_IMAGE_PIXELS or 89_478_485
    side = int((2 * limit) ** 0.5) + 100
    with pytest.raises(ImageTooLargeError, match="huge.png"):
        decode_image(png_header_only(side, side), max_pixels=None, name="huge.png")


# ----------------------------------------------------------------------------------------------
# image_size, read/write through fsspec


def test_image_size_from_bytes_and_file():
    data = save(Image.fromarray(RGB), "JPEG")
    assert image_size(data) == (13, 9)
    assert image_size(io.BytesIO(data)) == (13, 9)
    with pytest.raises(ImageDecodeError, match="x.bin"):
        image_size(b"nope", name="x.bin")


def test_read_write_local_and_file_url(tmp_path):
    target = tmp_path / "a" / "b" / "c.png"
    data = encode_png(GREY)
    write_bytes(str(target), data)  # creates parents
    assert target.read_bytes() == data
    assert read_bytes(str(target)) == data
    assert read_bytes(target.as_uri()) == data
    write_bytes((tmp_path / "d" / "e.bin").as_uri(), b"xyz")
    assert (tmp_path / "d" / "e.bin").read_bytes() == b"xyz"
    assert read_image_size(target.as_uri()) == (13, 9)


def test_read_write_memory_url():
    uri = "memory://medseg-test-io/sub/x.png"
    data = encode_png(RGB)
    write_bytes(uri, data)
    assert read_bytes(uri) == data
    assert fsspec.filesystem("memory").cat_file("/medseg-test-io/sub/x.png") == data
    assert read_image_size(uri) == (13, 9)
    np.testing.assert_array_equal(decode_image(read_bytes(uri)), RGB)


def test_read_missing_raises():
    with pytest.raises(FileNotFoundError):
        read_bytes("memory://medseg-test-io/does-not-exist.png")


# ----------------------------------------------------------------------------------------------
# encoders


@pytest.mark.parametrize(
    "array",
    [
        GREY,
        GREY[:, :, None],
        RGB,
        np.dstack([RGB, GREY]),
        RNG.integers(0, 65536, (5, 7), dtype=np.uint16),
    ],
    ids=["L", "Lx1", "RGB", "RGBA", "I16"],
)
def test_encode_png_round_trip(array):
    data = encode_png(array)
    back = np.asarray(Image.open(io.BytesIO(data)))
    np.testing.assert_array_equal(back, array.reshape(back.shape))


def test_encode_png_bool_and_rejects_bad_arrays():
    mask = RNG.random((6, 4)) > 0.5
    back = np.asarray(Image.open(io.BytesIO(encode_png(mask))))
    np.testing.assert_array_equal(back, mask.astype(np.uint8) * 255)
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4, 2), dtype=np.uint8))


def test_encode_mask_png_round_trip():
    labels = RNG.integers(0, 3, (10, 12))
    data = encode_mask_png(labels)
    im = Image.open(io.BytesIO(data))
    assert im.mode == "L"
    assert set(np.unique(np.asarray(im)).tolist()) <= {0, 255}
    np.testing.assert_array_equal(decode_mask(data), (labels != 0).astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# RLE


def test_rle_known_cases_by_hand():
    # column-major: col 0 = 0,1,0 ; col 1 = 1,1,0 -> 0 | 1 | 0 | 1 1 | 0
    mask = np.array([[0, 1], [1, 1], [0, 0]], dtype=np.uint8)
    assert rle_encode(mask) == {"size": [3, 2], "counts": [1, 1, 1, 2, 1]}
    # first pixel set -> leading zero-length run of zeros
    assert rle_encode(np.array([[1, 0]]))["counts"] == [0, 1, 1]
    assert rle_encode(np.zeros((2, 2)))["counts"] == [4]
    assert rle_encode(np.ones((2, 3)))["counts"] == [0, 6]
    np.testing.assert_array_equal(rle_decode({"size": [3, 2], "counts": [1, 1, 1, 2, 1]}), mask)


def test_rle_compressed_strings_by_hand():
    # COCO string form: 5-bit groups + 48, deltas against counts[i-2] from i = 3.
    mask = np.array([[0, 1], [1, 1], [0, 0]], dtype=np.uint8)
    assert rle_encode(mask, compressed=True)["counts"] == "11110"
    assert rle_encode(np.zeros((10, 10)), compressed=True)["counts"] == "T3"  # 100 = 3*32 + 4
    # counts [0, 5, 10, 2]: 2 - 5 = -3 is written as one sign-extended group 'M'
    col = np.zeros((17, 1), dtype=np.uint8)
    col[0:5] = 1
    col[15:17] = 1
    assert rle_encode(col)["counts"] == [0, 5, 10, 2]
    assert rle_encode(col, compressed=True)["counts"] == "05:M"
    np.testing.assert_array_equal(rle_decode({"size": [17, 1], "counts": "05:M"}), col)


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (32, 48), (0, 4), (64, 1)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_rle_round_trip(shape, density):
    mask = (RNG.random(shape) < density).astype(np.uint8)
    for compressed in (False, True):
        rle = rle_encode(mask, compressed=compressed)
        assert rle["size"] == list(shape)
        back = rle_decode(rle)
        assert back.dtype == np.uint8
        np.testing.assert_array_equal(back, mask)
    counts = rle_encode(mask)["counts"]
    assert sum(counts) == mask.size


def test_rle_rejects_inconsistent_counts():
    with pytest.raises(ValueError):
        rle_decode({"size": [2, 2], "counts": [1, 1]})


def test_rle_size_is_capped_before_allocating():
    """Seven bytes of compressed RLE describe a 10-gigapixel mask: refused from its size."""
    big = {"size": [100_000, 100_000], "counts": "PPigPZ9"}
    with pytest.raises(ImageTooLargeError, match="exceeds the limit"):
        rle_decode(big)
    with pytest.raises(ImageTooLargeError):
        rle_decode({"size": [3, 2], "counts": [6]}, max_pixels=5)
    assert not rle_decode({"size": [3, 2], "counts": [6]}, max_pixels=6).any()
    with pytest.raises(ValueError, match="negative"):
        rle_decode({"size": [-2, -3], "counts": [6]})


def test_bounded_reads_over_http_take_an_unsatisfiable_range_as_an_empty_file():
    """A server that honours Range answers a ranged GET of an empty file with 416 (RFC 9110),
    as S3 does: that is an empty file, not a failure; a larger file is refused unread."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from medseg_core.io import ImageTooLargeError, read_bytes

    files = {"/empty.png": b"", "/small.png": b"x" * 10}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            self.do_GET(head=True)

        def do_GET(self, head: bool = False) -> None:
            body = files.get(self.path)
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if m:
                start = int(m[1])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = body[start:int(m[2]) + 1 if m[2] else None]
                self.send_response(206)
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        assert read_bytes(f"{base}/empty.png") == b""
        assert read_bytes(f"{base}/small.png", max_bytes=10) == b"x" * 10
        with pytest.raises(ImageTooLargeError, match="small.png: more than max_bytes"):
            read_bytes(f"{base}/small.png", max_bytes=9)
        with pytest.raises(FileNotFoundError):
            read_bytes(f"{base}/missing.png")
    finally:
        server.shutdown()


def test_an_http_login_comes_from_netrc_not_from_the_url(tmp_path, monkeypatch):
    """The route the refusal of `user:password@` URLs advises: a ~/.netrc entry ($NETRC), read
    with client_kwargs.trust_env=true in the storage options."""
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from medseg_core.io import check_url_credentials, read_bytes

    login = "Basic " + base64.b64encode(b"alice:s3cr3t").decode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            ok = self.headers.get("Authorization") == login
            body = b"image bytes" if ok else b""
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/a.png"
    try:
        with pytest.raises(ValueError, match=r"data.url: the URL carries credentials "
                                             r"\(http://\*\*\*@127.0.0.1:\d+/a.png\)"):
            check_url_credentials(url.replace("//", "//alice:s3cr3t@"), "data.url")
        with pytest.raises(Exception, match="401"):
            read_bytes(url)
        netrc = tmp_path / "netrc"
        netrc.write_text("machine 127.0.0.1 login alice password s3cr3t\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc))
        assert read_bytes(url, {"client_kwargs": {"trust_env": True}}) == b"image bytes"
    finally:
        server.shutdown()


def test_file_names_holding_a_double_colon_are_read_literally(tmp_path):
    """fsspec reads '::' in a URL as a chain of filesystems: `/x/a::b.png` opened `/x/a`."""
    from medseg_core.io import object_fs, read_bytes
    from pipelines.data import fetch_many

    (tmp_path / "a").write_bytes(b"the wrong file")
    target = tmp_path / "a::b.png"
    target.write_bytes(b"the right file")
    assert read_bytes(str(target)) == b"the right file"
    assert read_bytes(f"file://{target}") == b"the right file"
    assert fetch_many([str(target)], None)[str(target)] == b"the right file"
    fs, path = object_fs("s3://bucket/x::y.png", {"anon": True})
    assert (fs.protocol[0], path) == ("s3", "bucket/x::y.png")


def test_exif_orientation_is_reported_not_applied():
    rgb = RNG.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6   # viewers show the image turned 90 degrees clockwise
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", exif=exif, quality=95)
    assert exif_orientation(buf.getvalue()) == 6
    assert decode_image(buf.getvalue()).shape == (6, 9, 3)   # stored order
    exif[0x0112] = 1
    plain = io.BytesIO()
    Image.fromarray(rgb).save(plain, "JPEG", exif=exif)
    assert exif_orientation(plain.getvalue()) is None
    assert exif_orientation(save(Image.fromarray(rgb), "PNG")) is None


def test_a_file_that_is_no_image_is_named_with_every_format_read():
    with pytest.raises(ImageDecodeError, match=r"^notes\.png: not a recognised image "
                                               r"\(PNG/JPEG/BMP/TIFF/GIF/WEBP/PPM\)$"):
        decode_image(b"just some text, not pixels", name="notes.png")


@pytest.mark.parametrize("compression", [None, "tiff_deflate"])  # Pillow's own and libtiff's
def test_tiff_decodes_in_stored_order_whatever_its_orientation_tag(compression):
    """Pillow turns a TIFF by its Orientation tag as it loads it (no other format), while the
    endpoint said pixels come in stored order and reported the tag for the client to turn the
    mask: a client doing so turned a TIFF's mask twice."""
    from medseg_core.io import decode_image, decode_mask, exif_orientation, image_size

    stored = np.arange(4 * 7 * 3, dtype=np.uint8).reshape(4, 7, 3)
    mask = np.zeros((4, 7), np.uint8)
    mask[0, :3] = 255
    def tiff(a, orientation):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "TIFF", tiffinfo={274: orientation},
                                compression=compression)
        return buf.getvalue()

    for orientation in range(1, 9):
        data = tiff(stored, orientation)
        assert np.array_equal(decode_image(data), stored), orientation
        assert np.array_equal(decode_mask(tiff(mask, orientation)), mask > 0), orientation
        assert image_size(data) == (7, 4)
        assert exif_orientation(data) == (None if orientation == 1 else orientation)
