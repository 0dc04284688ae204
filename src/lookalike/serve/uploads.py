"""Uploaded bytes -> image: the format is sniffed from the content, never taken from the name or header."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from ..images import DECODED_FORMATS, MAX_PIXELS, check_shape
from .errors import ApiError

#: Formats accepted from clients: the decoders lookalike.images reaches (JPEG's includes the phones' MPO), but not
#: GIF content, which a file scan only tolerates under another name; Pillow's other plugins stay unreachable.
ALLOWED_FORMATS = tuple(f for f in DECODED_FORMATS if f != "GIF")


def sniff_format(data: bytes, name: str) -> tuple[str, tuple[int, int]]:
    """Format and size read from the file header, after refusing empty, foreign and oversized images."""
    if not data:
        raise ApiError(422, "empty_file", f"{name}: the uploaded file is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
                fmt, (w, h) = img.format, img.size
        except Image.DecompressionBombError:
            raise too_many_pixels(name, None) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"{name}: not a JPEG, PNG, WebP, BMP, TIFF or HEIC image (the content is checked; the file name and Content-Type are ignored)",
            ) from None
    if w * h > MAX_PIXELS:
        raise too_many_pixels(name, (w, h))
    check_shape(name, w, h)
    return fmt, (w, h)


def too_many_pixels(name: str, size: tuple[int, int] | None) -> ApiError:
    dims = f" is {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels," if size else ""
    return ApiError(413, "image_too_large", f"{name}{dims} over the {MAX_PIXELS:,}-pixel limit (possible decompression bomb); downscale it first")

