"""A corpus of hostile image files, generated on demand (nothing large is ever held in memory or on disk).

Each Case writes one file system entry named like an image. `data` cases are plain bytes, so they
can also be uploaded to the service; the others (FIFOs, links to devices, folders) exist only on disk.
Every case is one the tools must refuse with a clear reason: a 4xx from the service, an entry in the
"skipped" list from the command-line tools, and never a hang, a memory blow-up or a half-written output.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

#: The reason each refused case must give (a fragment of the message).
EXPECTED = {
    "wide_strip": "aspect ratio",
    "tall_strip": "aspect ratio",
    "giant_strip": "aspect ratio",
    "pixel_bomb_header": "pixels",
    "jpeg_bomb_header": "pixels",
    "empty": "empty",
    "truncated_jpeg": "truncated",
    "text_as_jpeg": "not a recognised image format",
    "html_as_png": "not a recognised image format",
    "eps_as_jpg": "not a recognised image format",
    "png_text_bomb": "corrupt",
    "zero_width_png": "not a recognised image format",
    "fifo": "not a regular file",
    "dev_zero_link": "not a regular file",
    "folder": "not a regular file",
    "dangling_link": "No such file",
}


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_header(width: int, height: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def black_png(width: int, height: int) -> bytes:
    """A valid all-black RGB PNG of any size, compressed row by row (an 80,000,000 x 1 image is 9.8 KB)."""
    z = zlib.compressobj(9)
    block = b"\x00" * (1 << 20)
    parts = []
    for _ in range(height):
        left = 1 + 3 * width
        while left:
            parts.append(z.compress(block[: min(left, len(block))]))
            left -= min(left, len(block))
    idat = b"".join(parts) + z.flush()
    return png_header(width, height) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _jpeg(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def _jpeg_with_size(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims another size (the SOF0 marker rewritten)."""
    data = bytearray(_jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _png_text_bomb() -> bytes:
    """A tiny PNG carrying a zTXt chunk that inflates to 64 MB."""
    small = black_png(8, 8)
    z = zlib.compressobj(9)
    text = b"".join(z.compress(b"A" * (1 << 20)) for _ in range(64)) + z.flush()
    bomb = _chunk(b"zTXt", b"Comment\x00\x00" + text)
    return small[:33] + bomb + small[33:]


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Path], None]
    data: bytes | None = None  # the bytes, for cases that are plain files (and can be uploaded)
    suffix: str = ".png"

    @property
    def reason(self) -> str:
        return EXPECTED[self.name]

    def write(self, folder: Path, stem: str | None = None) -> Path:
        path = Path(folder) / f"{stem or self.name}{self.suffix}"
        self.make(path)
        return path


def _bytes_case(name: str, data: bytes, suffix: str = ".png") -> Case:
    return Case(name, lambda p: p.write_bytes(data), data, suffix)


def cases() -> list[Case]:
    """Every hostile case, in a fixed order."""
    jpeg = _jpeg()
    return [
        _bytes_case("wide_strip", black_png(10_000, 1)),
        _bytes_case("tall_strip", black_png(1, 3_000)),
        _bytes_case("giant_strip", black_png(80_000_000, 1)),
        _bytes_case("pixel_bomb_header", png_header(30_000, 30_000) + _chunk(b"IEND", b"")),
        _bytes_case("jpeg_bomb_header", _jpeg_with_size(60_000, 60_000), ".jpg"),
        _bytes_case("empty", b"", ".jpg"),
        _bytes_case("truncated_jpeg", jpeg[: len(jpeg) // 2], ".jpg"),
        _bytes_case("text_as_jpeg", b"just some text, not a picture\n" * 10, ".jpg"),
        _bytes_case("html_as_png", b"<html><script>alert(1)</script></html>"),
        _bytes_case("eps_as_jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", ".jpg"),
        _bytes_case("png_text_bomb", _png_text_bomb()),
        _bytes_case("zero_width_png", png_header(0, 10) + _chunk(b"IEND", b"")),
        Case("fifo", lambda p: os.mkfifo(p), suffix=".jpg"),
        Case("dev_zero_link", lambda p: os.symlink("/dev/zero", p), suffix=".jpg"),
        Case("folder", lambda p: p.mkdir(), suffix=".jpg"),
        Case("dangling_link", lambda p: os.symlink(p.parent / f"{p.stem}.missing.jpg", p), suffix=".jpg"),
    ]


def upload_cases() -> list[Case]:
    """The cases that are plain bytes (the service only ever sees bytes)."""
    return [c for c in cases() if c.data is not None]


def write_corpus(folder: Path, only: list[str] | None = None) -> dict[str, Path]:
    """Write the cases (or those named in `only`) into `folder`; {case name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    return {c.name: c.write(folder) for c in cases() if only is None or c.name in only}
