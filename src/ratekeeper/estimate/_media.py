"""Images and PDFs in tokens: an image's size read from its base64 header, a PDF's pages counted.

An image is charged after the API's downscaling, a PDF page as its text plus an
image of the page. The figures approximate the API's; ``docs/estimation.md``
says where each comes from.
"""

from __future__ import annotations

import binascii
import math
import re
from typing import Final

__all__ = ["DOCUMENT_DEFAULT_TOKENS", "IMAGE_DEFAULT_TOKENS", "image_size", "image_tokens"]

# Images: the API scales an image to fit a 1568 px long edge and ~1,600 tokens
# (~1.15-1.2 MP), then charges width * height / 750 tokens.
_IMAGE_MAX_EDGE: Final = 1568
_IMAGE_MAX_TOKENS: Final = 1600
_IMAGE_PIXELS_PER_TOKEN: Final = 750
#: An image whose size can't be read (URL, Files API, unknown format) is charged the maximum.
IMAGE_DEFAULT_TOKENS: Final = _IMAGE_MAX_TOKENS
# Enough base64 to reach a JPEG's SOF marker past a typical EXIF block.
_IMAGE_HEADER_CHARS: Final = 128 * 1024

# PDFs: every page is sent as text (1,500-3,000 tokens a page) plus an image of the page.
_PDF_PAGE_TOKENS: Final = 1_500 + _IMAGE_MAX_TOKENS
# When no page objects are visible (compressed object streams): pages from the size.
_PDF_BYTES_PER_PAGE: Final = 25_000
_PDF_MAX_PAGES: Final = 100
# Bodies are at most 32 MB; this bounds the decode of one PDF whatever the caller sends.
_PDF_SCAN_CHARS: Final = 48 * 1024 * 1024
_PDF_PAGE_OBJECT: Final = re.compile(rb"/Type\s*/Page\b")
#: A PDF given by URL or file id: five pages' worth.
DOCUMENT_DEFAULT_TOKENS: Final = 5 * _PDF_PAGE_TOKENS


def _b64_head(data: str, chars: int) -> bytes:
    head = data[:chars]
    head = head[: len(head) - len(head) % 4]
    try:
        return binascii.a2b_base64(head)
    except ValueError:  # binascii.Error, or non-ASCII text
        return b""


def _jpeg_size(b: bytes) -> tuple[int, int] | None:
    i, n = 2, len(b)
    while i + 9 <= n:
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
            return int.from_bytes(b[i + 7 : i + 9], "big"), int.from_bytes(b[i + 5 : i + 7], "big")
        length = int.from_bytes(b[i + 2 : i + 4], "big")
        if length < 2:
            return None
        i += 2 + length
    return None


def _webp_size(b: bytes) -> tuple[int, int] | None:
    chunk = b[12:16]
    if chunk == b"VP8 " and len(b) >= 30 and b[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(b[26:28], "little") & 0x3FFF, int.from_bytes(b[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and len(b) >= 25 and b[20] == 0x2F:
        bits = int.from_bytes(b[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(b) >= 30:
        return int.from_bytes(b[24:27], "little") + 1, int.from_bytes(b[27:30], "little") + 1
    return None


def image_size(data: str) -> tuple[int, int] | None:
    """Width and height from a base64 PNG, GIF, WebP or JPEG header; None if unreadable."""
    b = _b64_head(data, _IMAGE_HEADER_CHARS)
    size: tuple[int, int] | None = None
    if b.startswith(b"\x89PNG\r\n\x1a\n") and len(b) >= 24:
        size = int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big")
    elif b[:6] in (b"GIF87a", b"GIF89a") and len(b) >= 10:
        size = int.from_bytes(b[6:8], "little"), int.from_bytes(b[8:10], "little")
    elif b[:4] == b"RIFF" and b[8:12] == b"WEBP":
        size = _webp_size(b)
    elif b[:2] == b"\xff\xd8":
        size = _jpeg_size(b)
    if size is None or size[0] <= 0 or size[1] <= 0:
        return None
    return size


def image_tokens(width: int, height: int) -> int:
    """Tokens for an image of ``width`` x ``height`` pixels, after the API's downscaling.

    >>> image_tokens(200, 200), image_tokens(1000, 1000), image_tokens(4000, 3000)
    (54, 1334, 1600)
    """
    scale = min(1.0, _IMAGE_MAX_EDGE / max(width, height))
    pixels = (width * scale) * (height * scale)
    return max(1, min(_IMAGE_MAX_TOKENS, math.ceil(pixels / _IMAGE_PIXELS_PER_TOKEN)))


def _pdf_pages(data: str) -> int:
    size = len(data) * 3 // 4
    pages = 0
    if len(data) <= _PDF_SCAN_CHARS:
        try:
            pages = len(_PDF_PAGE_OBJECT.findall(binascii.a2b_base64(data)))
        except ValueError:
            pages = 0
    if pages == 0:
        pages = math.ceil(size / _PDF_BYTES_PER_PAGE)
    return max(1, min(_PDF_MAX_PAGES, pages))
