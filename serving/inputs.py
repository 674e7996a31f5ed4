"""Request-side checks of the ingress, kept free of Ray and of FastAPI routing so they can be
read and tested on their own: media types, a size-limited body reader, a multipart parser
(boundaries found with bytes.find, so a hostile body costs C-speed scans; `python-multipart` is
not a dependency), magic-byte sniffing, bearer-token comparison. Everything raises `ApiError`,
which the app turns into a JSON error response."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

# Leading bytes of the formats the API accepts (PNG, JPEG, BMP, little/big-endian TIFF and
# BigTIFF). Pillow can parse more (GIF, WebP, ...); the API does not offer them.
MAGIC = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/bmp": (b"BM",),
    "image/tiff": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
}
# Aliases clients send for the same formats.
ALIASES = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "image/x-png": "image/png",
    "image/x-bmp": "image/bmp",
    "image/x-ms-bmp": "image/bmp",
    "image/tif": "image/tiff",
    "image/x-tiff": "image/tiff",
}
MULTIPART = "multipart/form-data"
# Part types accepted inside a multipart upload besides the image types: what browsers and
# curl send when they do not know the file's type. The bytes are sniffed either way.
GENERIC_PART_TYPES = ("application/octet-stream",)
FILE_FIELDS = ("file", "image")


class ApiError(Exception):
    """An error answered as `{"error": {"code", "message"}}` with HTTP `status`."""

    def __init__(self, status: int, code: str, message: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def media_type(header: str | None) -> str:
    """`Content-Type` header -> lower-case media type without parameters ('' when absent)."""
    if not header:
        return ""
    kind = header.split(";", 1)[0].strip().lower()
    return ALIASES.get(kind, kind)


def check_content_length(header: str | None, limit: int) -> int | None:
    """Declared body size (None when absent); 413 above `limit` before any byte is read."""
    if header is None:
        return None
    try:
        size = int(header.strip())
    except ValueError:
        raise ApiError(400, "bad_request", "Content-Length is not an integer") from None
    if size < 0:
        raise ApiError(400, "bad_request", "Content-Length is negative")
    if size > limit:
        raise ApiError(413, "payload_too_large",
                       f"request body is {size} bytes, over the limit of {limit} bytes")
    return size


async def read_limited(chunks: AsyncIterator[bytes], limit: int,
                       idle_timeout: float | None = None) -> bytes:
    """Concatenate a streamed body, failing with 413 as soon as it exceeds `limit` bytes
    (covers chunked uploads and a Content-Length that understates the body), and with 408 when
    no byte arrives for `idle_timeout` seconds (a stalled upload; a slow but steady one goes on).
    """
    parts: list[bytes] = []
    size = 0
    stream = chunks.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), idle_timeout)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise ApiError(408, "request_timeout", f"no byte of the request body arrived for "
                           f"{idle_timeout:g} s (limits.body_idle_timeout_s)") from None
        if not chunk:
            continue
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large",
                           f"request body exceeds the limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def sniff(data: bytes, allowed: tuple[str, ...] | list[str]) -> str:
    """Media type of `data` from its first bytes; 400 unless it is one of `allowed`."""
    for kind in allowed:
        if any(data.startswith(m) for m in MAGIC.get(kind, ())):
            return kind
    names = "/".join(k.split("/")[1].upper() for k in allowed)
    raise ApiError(400, "invalid_image", f"request body is not a {names} image")


@dataclass
class Upload:
    data: bytes
    content_type: str
    filename: str | None


# Multipart bounds: a form upload has a handful of parts with short headers; without these a
# body of many tiny parts costs a Python-level loop per part.
MAX_PARTS = 32
MAX_PART_HEADER_BYTES = 16 * 1024
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
# RFC 2046 boundary characters, not ending with a space; RFC 2046 caps the length at 70, the
# email parser used before did not, so longer ones (to 200) stay accepted.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,199}[0-9A-Za-z'()+_,\-./:=?]")


def header_params(value: str) -> dict[str, str]:
    """Parameters of a header value (`form-data; name="file"; filename="a.png"`), names
    lower-cased, quoted strings unquoted; an RFC 5987 `name*=charset''text` wins over `name`."""
    params: dict[str, str] = {}
    extended: dict[str, str] = {}
    for key, raw in _PARAM.findall(value):
        key = key.lower()
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        if key.endswith("*"):
            charset, _, rest = raw.partition("'")
            _, _, text = rest.partition("'")
            # the two charsets RFC 5987 names; others (punycode, idna) are ignored, and decoding
            # failed with a UnicodeError the parser let through (a 500)
            if charset.lower() not in ("", "utf-8", "iso-8859-1", "us-ascii"):
                continue
            try:
                extended[key[:-1]] = urllib.parse.unquote(text, charset or "utf-8",
                                                          errors="strict")
            except UnicodeError:
                continue
        else:
            params.setdefault(key, raw)
    return {**params, **extended}


@dataclass
class _Part:
    headers: dict[str, str]
    start: int
    end: int


def _malformed(why: str = "") -> ApiError:
    return ApiError(400, "bad_request",
                    "malformed multipart/form-data body" + (f": {why}" if why else ""))


def _part_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    last = None
    for line in block.decode("utf-8", "replace").split("\r\n"):
        if line[:1] in (" ", "\t") and last is not None:  # obsolete header folding
            headers[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise _malformed("bad part header line")
        last = name.strip().lower()
        headers[last] = value.strip()
    return headers


def _split_parts(body: bytes, boundary: bytes) -> list[_Part]:
    """Part spans of a multipart body (RFC 2046: CRLF line breaks, the CRLF before each
    delimiter belongs to it, preamble and epilogue ignored). Only bytes.find/count touch the
    whole body, so the cost is C-speed scans plus a Python step per part (at most MAX_PARTS)."""
    dash = b"--" + boundary
    delim = b"\r\n" + dash
    too_many = ApiError(400, "bad_request", f"multipart body has more than {MAX_PARTS} parts")
    # one delimiter ends each part, and one more follows a preamble
    if body.count(delim) > MAX_PARTS + 1:
        raise too_many
    if body.startswith(dash):
        pos = len(dash)
    else:
        found = body.find(delim)
        if found < 0:
            raise _malformed("no boundary delimiter")
        pos = found + len(delim)
    parts: list[_Part] = []
    while True:
        if body.startswith(b"--", pos):  # close delimiter; the epilogue is ignored
            return parts
        eol = body.find(b"\r\n", pos)
        if eol < 0 or body[pos:eol].strip(b" \t"):
            raise _malformed("bad boundary line")
        start = eol + 2
        end = body.find(delim, start)
        if end < 0:
            raise _malformed("no closing boundary")
        if body.startswith(b"\r\n", start):  # no part headers
            headers, content = {}, start + 2
        else:
            # + 2: the blank line ending the headers may share its CRLF with the delimiter
            # (a part with headers and no body)
            split = body.find(b"\r\n\r\n", start, min(end + 2, start + MAX_PART_HEADER_BYTES))
            if split < 0:
                raise _malformed("part headers missing or too long")
            headers, content = _part_headers(body[start:split]), split + 4
        if len(parts) == MAX_PARTS:
            raise too_many
        parts.append(_Part(headers, min(content, end), end))
        pos = end + len(delim)


def parse_multipart(body: bytes, content_type_header: str) -> Upload:
    """The image part of a `multipart/form-data` body: the first non-empty field named `file`
    or `image`, else the first non-empty part carrying a filename (an empty one where all are
    empty). 400 when the body is malformed or has no file."""
    if "boundary=" not in content_type_header.lower():
        raise ApiError(400, "bad_request", "multipart/form-data without a boundary parameter")
    boundary = header_params(content_type_header).get("boundary", "")
    if not _BOUNDARY.fullmatch(boundary):
        raise _malformed("invalid boundary parameter")
    named: list[tuple[_Part, dict[str, str]]] = []
    with_filename: list[tuple[_Part, dict[str, str]]] = []
    for part in _split_parts(body, boundary.encode("ascii")):
        disposition = header_params(part.headers.get("content-disposition", ""))
        if disposition.get("name") in FILE_FIELDS:
            named.append((part, disposition))
        elif disposition.get("filename"):
            with_filename.append((part, disposition))
    # an empty `file` part before the image (a form's unused file input) is passed over
    candidates = named + with_filename
    chosen = next((c for c in candidates if c[0].end > c[0].start), None) or next(
        iter(candidates), None)
    if chosen is None:
        raise ApiError(400, "bad_request",
                       "multipart body has no file part (send the image as field 'file')")
    part, disposition = chosen
    return Upload(body[part.start:part.end], media_type(part.headers.get("content-type")),
                  disposition.get("filename") or None)


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (None when absent or another scheme)."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def load_token(token_env: str | None, token_file: str | None) -> bytes | None:
    """The API token as UTF-8 bytes: the variable ``token_env`` when set and non-blank, else the
    file ``token_file`` (a mounted secret); surrounding whitespace (a file's newline) dropped.
    None when neither gives one."""
    value = os.environ.get(token_env, "").strip() if token_env else ""
    if not value and token_file:
        with open(token_file, encoding="utf-8") as f:
            value = f.read().strip()
    return value.encode("utf-8") if value else None


def token_matches(given: str | None, expected: bytes) -> bool:
    """Constant-time comparison (of SHA-256 digests, so the length does not leak either).

    ``given`` is a header value as Starlette decodes it (latin-1), so its bytes are the ones the
    client sent: a UTF-8 token with non-ASCII characters matches."""
    if given is None:
        return False
    try:
        raw = given.encode("latin-1")
    except UnicodeEncodeError:  # not from a header: cannot be the token's bytes
        return False
    a = hashlib.sha256(raw).digest()
    b = hashlib.sha256(expected).digest()
    return hmac.compare_digest(a, b)
