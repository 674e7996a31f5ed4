"""Request-side checks of the ingress, kept free of Ray and of FastAPI routing so they can be
read and tested on their own: media types, a size-limited body reader, a multipart parser (the
stdlib `email` parser: `python-multipart` is not a dependency), magic-byte sniffing, bearer-token
comparison. Everything raises `ApiError`, which the app turns into a JSON error response."""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import hmac
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


async def read_limited(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """Concatenate a streamed body, failing with 413 as soon as it exceeds `limit` bytes
    (covers chunked uploads and a Content-Length that understates the body)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
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


def parse_multipart(body: bytes, content_type_header: str) -> Upload:
    """The image part of a `multipart/form-data` body: the field named `file` or `image`,
    else the first part carrying a filename. 400 when the body is malformed or has no file."""
    if "boundary=" not in content_type_header.lower():
        raise ApiError(400, "bad_request", "multipart/form-data without a boundary parameter")
    header = f"Content-Type: {content_type_header}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    try:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
    except Exception as exc:  # the email parser is lenient; this is belt and braces
        raise ApiError(400, "bad_request", f"malformed multipart body: {exc}") from None
    if not message.is_multipart() or message.defects:
        raise ApiError(400, "bad_request", "malformed multipart/form-data body")
    chosen = None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        if name in FILE_FIELDS:
            chosen = part
            break
        if chosen is None and filename:
            chosen = part
    if chosen is None:
        raise ApiError(400, "bad_request",
                       "multipart body has no file part (send the image as field 'file')")
    payload = chosen.get_payload(decode=True)
    if not isinstance(payload, bytes):
        raise ApiError(400, "bad_request", "multipart file part has no content")
    kind = media_type(chosen.get("content-type")) if chosen.get("content-type") else ""
    return Upload(payload, kind, chosen.get_filename())


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (None when absent or another scheme)."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_matches(given: str | None, expected: bytes) -> bool:
    """Constant-time comparison (of SHA-256 digests, so the length does not leak either)."""
    if given is None:
        return False
    a = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
    b = hashlib.sha256(expected).digest()
    return hmac.compare_digest(a, b)
