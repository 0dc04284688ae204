"""Opening user images safely: every odd format becomes an upright RGB picture or a clear BadImageError."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Iterator, TypedDict

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pillow_heif import register_heif_opener

from .errors import BadImageError, LookalikeError
from .fileio import open_regular

register_heif_opener()  # HEIC: what iPhones save photos as

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".heic", ".heif"})  # .jfif: JPEG as Windows saves it
#: how messages name the extensions looked for
LOOKED_FOR = "looked for " + " ".join(sorted(IMAGE_EXTENSIONS))

#: The extension a file saved from bytes gets (downloads, uploads), for each format read from users' files;
#: MPO is the multi-picture JPEG phones write, which Pillow opens as a JPEG but names apart.
FORMAT_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif", "HEIF": ".heic"}

#: Formats decoded, whatever the file's name says: those above (MPO through the JPEG decoder) plus GIF content
#: saved under another name. Pillow's other plugins stay unreachable (EPS, for one, would run Ghostscript on the file).
DECODED_FORMATS = (*(f for f in FORMAT_EXTENSIONS if f != "MPO"), "GIF")

#: Largest image we decode, in pixels (Pillow's own bomb threshold, about 9.5k x 9.5k); larger files are refused.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

#: Longest side over shortest side accepted. Preprocessing scales the short side up to the model's
#: input size, so a 10000x1 strip would become a 2,240,000x224 picture; beyond 50:1 (wider than any
#: panorama) an image is refused, and the resize never needs more than 50 input-size squares.
MAX_ASPECT_RATIO = 50


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a visible file with a supported image extension (any case)."""
    p = Path(path)
    return not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def iter_image_files(root: str | os.PathLike, passed_over: list[tuple[Path, str]] | None = None) -> Iterator[Path]:
    """Every visible image file below `root` (hidden folders skipped), folder by folder in name order; symlinks kept.

    The one folder walk of the package. Linked folders are followed like real ones (a linked attribute folder
    is part of the collection), each real folder once; a link to a folder already walked, or up to one that holds
    `root`, is not followed. With `passed_over`, visible files that are not images, such links and folders that
    cannot be read are appended to it as (path, reason).
    """

    def unreadable(e: OSError) -> None:
        if passed_over is not None:
            passed_over.append((Path(e.filename), f"unreadable folder ({e.strerror})"))

    top = os.path.realpath(root)
    visited = {top}
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        kept = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real in visited or os.path.commonpath([real, top]) == real:
                if passed_over is not None:
                    passed_over.append((Path(dirpath) / d, "a link to a folder this walk already covers"))
                continue
            visited.add(real)
            kept.append(d)
        dirnames[:] = kept
        for name in sorted(filenames):
            if is_image_file(name):
                yield Path(dirpath) / name
            elif passed_over is not None and not name.startswith("."):
                passed_over.append((Path(dirpath) / name, "not an image file (unsupported extension)"))


def scan_images(root: str | os.PathLike) -> list[tuple[str, str | None]]:
    """(absolute path, attribute) of every visible image below `root`; the attribute is the top sub-folder."""
    root = Path(os.path.abspath(Path(root).expanduser()))  # absolute, symlinks kept: the path the user sees
    if not root.is_dir():
        raise LookalikeError(f"{root} is not a folder; pass a folder of images (optionally one sub-folder per attribute)")
    found = []
    for path in iter_image_files(root):
        rel = path.parent.relative_to(root).parts
        found.append((str(path), rel[0] if rel else None))
    return found


class Skipped(TypedDict):
    """A file left out of the work, and why: how every report, log and JSON output lists one."""

    path: str
    reason: str


def skipped_file(path: str | os.PathLike, why: str | OSError | BadImageError) -> Skipped:
    """The Skipped entry of a file that could not be used: `why` is a BadImageError, another OSError, or the reason."""
    if isinstance(why, BadImageError):
        reason = why.reason
    elif isinstance(why, OSError):
        reason = unreadable_reason(why)
    else:
        reason = str(why)
    return {"path": str(path), "reason": reason}


def unreadable_reason(error: OSError) -> str:
    """The reason given for a file the operating system would not let us read."""
    return f"cannot read file ({error.strerror or error})"


def open_image(path: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """Decode `path` into an upright 8-bit RGB image.

    EXIF rotation is applied; palette, alpha, CMYK, greyscale and 16-bit images are converted;
    zero-byte, truncated, non-image and oversized files raise BadImageError. `draft_size` lets
    JPEG decoding downscale in the DCT domain when the image is much larger than needed.
    """
    path = Path(path)
    try:
        f = open_regular(path)
    except OSError as e:
        raise BadImageError(path, unreadable_reason(e)) from None
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            raise BadImageError(path, "file is empty (0 bytes)")
        return _decode(f, path, draft_size)


def open_image_bytes(data: bytes, name: str = "<upload>", draft_size: int | None = None) -> Image.Image:
    """Like open_image, for bytes already in memory (uploads, downloads)."""
    if not data:
        raise BadImageError(name, "file is empty (0 bytes)")
    return _decode(io.BytesIO(data), name, draft_size)


def _decode(source, name, draft_size: int | None) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(source, formats=DECODED_FORMATS) as img:
                check_shape(name, *img.size)
                if draft_size and img.format == "JPEG":
                    img.draft("RGB", (draft_size, draft_size))
                img.load()
                return to_rgb(ImageOps.exif_transpose(img))
        except BadImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadImageError(name, f"image is larger than {MAX_PIXELS:,} pixels (possible decompression bomb)") from None
        except UnidentifiedImageError:
            raise BadImageError(name, "not a recognised image format") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise BadImageError(name, f"corrupt or truncated image ({e})") from None


def check_shape(path, w: int, h: int) -> None:
    """Refuse, from the header alone, images with no pixels, too many pixels or an absurd aspect ratio."""
    if w < 1 or h < 1:
        raise BadImageError(path, f"image has no pixels ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise BadImageError(path, f"image is {w}x{h} = {w * h:,} pixels, over the {MAX_PIXELS:,} limit (possible decompression bomb)")
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise BadImageError(
            path, f"image is {w}x{h}, an aspect ratio over {MAX_ASPECT_RATIO}:1 that cannot be centre-cropped meaningfully; crop it to the part that matters"
        )


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB; transparency is composited onto white; 16-bit, 32-bit and floating-point grey are scaled
    down from the smallest usual range that holds them (0-1, 0-255, 0-65535, else their maximum), never clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _high_bit_grey_to_rgb(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


_GREY_BLOCK_ROWS = 256


def _high_bit_grey_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit or float grey to 8 bits a band of rows at a time.

    A whole 9400x9400 image in float64 would take 700 MB and seconds per copy, from a PNG of 170 KB; a band of
    rows keeps the extra memory to a few MB whatever the image's size.
    """
    w, h = img.size

    def band(top: int) -> np.ndarray:
        return np.nan_to_num(np.asarray(img.crop((0, top, w, min(h, top + _GREY_BLOCK_ROWS))), dtype=np.float32))

    if img.mode.startswith("I;16"):
        top_value = 65535.0
    else:
        peak = max(float(band(top).max(initial=0.0)) for top in range(0, h, _GREY_BLOCK_ROWS))
        top_value = next(t for t in (1.0, 255.0, 65535.0, peak) if peak <= t)
    grey = np.empty((h, w), np.uint8)
    for top in range(0, h, _GREY_BLOCK_ROWS):
        grey[top : top + _GREY_BLOCK_ROWS] = np.clip(band(top) * np.float32(255.0 / top_value) + np.float32(0.5), 0, 255)
    return Image.fromarray(grey, mode="L").convert("RGB")
