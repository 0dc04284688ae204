import io
import os
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from lookalike.errors import BadImageError
from lookalike.images import is_image_file, open_image, open_image_bytes


def test_extensions_any_case_and_hidden_files():
    assert is_image_file("a/b.JPG") and is_image_file("x.Jpeg") and is_image_file("y.webp") and is_image_file("z.TIF") and is_image_file("w.jfif")
    assert is_image_file("IMG_0001.HEIC") and is_image_file("v.heif")
    assert not is_image_file(".hidden.jpg") and not is_image_file("notes.txt")


@pytest.mark.parametrize("content,reason", [(b"", "empty"), (b"this is not an image", "not a recognised"), (b"<html><body>404</body></html>", "not a recognised")])
def test_unusable_files_are_refused_with_reason(tmp_path, content, reason):
    p = tmp_path / "bad.jpg"
    p.write_bytes(content)
    with pytest.raises(BadImageError, match=reason) as e:
        open_image(p)
    assert str(p) in str(e.value)


def test_truncated_jpeg_is_refused(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buf, "JPEG")
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadImageError, match="corrupt or truncated"):
        open_image(p)


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "RGBA", "LA", "I;16", "1"])
def test_odd_modes_become_rgb(tmp_path, mode):
    if mode == "I;16":
        img = Image.fromarray((np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16))
        fmt, name = "PNG", "x.png"
    else:
        img = Image.new("RGB", (32, 32), (200, 30, 30)).convert(mode)
        fmt, name = ("JPEG", "x.jpg") if mode == "CMYK" else ("PNG", "x.png")
    p = tmp_path / name
    img.save(p, fmt)
    out = open_image(p)
    assert out.mode == "RGB" and out.size == (32, 32)
    arr = np.asarray(out, np.float64)
    if mode == "I;16":
        assert arr.min() == 0 and arr.max() == 255, "16-bit range is scaled, not clipped"
        assert np.all(np.diff(arr[:, :, 0].ravel()) >= 0) and np.array_equal(arr[..., 0], arr[..., 2]), "a grey ramp stays a grey ramp"
    else:
        # the colour survives: red stays red (CMYK JPEGs are not inverted), grey modes keep the red's luma (81)
        expected = (81, 81, 81) if mode in ("L", "LA", "1") else (200, 30, 30)
        np.testing.assert_allclose(arr.reshape(-1, 3).mean(0), expected, atol=3 if mode != "1" else 5)


def test_a_large_16_bit_grey_image_is_scaled_in_bands_not_all_at_once():
    """A 4000x4000 16-bit PNG is 40 kB on disk; scaled as one float64 array it took 128 MB and more for each copy."""
    buf = io.BytesIO()
    Image.fromarray(np.tile(np.arange(4000, dtype=np.uint16) * 16, (4000, 1))).save(buf, "PNG")
    tracemalloc.start()
    try:
        out = open_image_bytes(buf.getvalue())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.size == (4000, 4000) and np.asarray(out)[0, -1, 0] == round(3999 * 16 / 65535 * 255)
    assert peak < 32 * 2**20, f"{peak / 2**20:.0f} MB of arrays for a 16 MB 8-bit image"


def test_alpha_composited_on_white(tmp_path):
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    p = tmp_path / "clear.png"
    img.save(p)
    assert np.asarray(open_image(p))[0, 0].tolist() == [255, 255, 255]


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    p = tmp_path / "rotated.jpg"
    img.save(p, "JPEG", exif=exif.tobytes())
    assert open_image(p).size == (20, 40)


def test_heic_photos_decode_upright_like_the_same_jpeg(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # a red corner shows where the top-left went
    exif = Image.Exif()
    exif[0x0112] = 6  # as a phone held upright records it
    for name, fmt in (("a.heic", "HEIF"), ("a.jpg", "JPEG")):
        img.save(tmp_path / name, fmt, exif=exif.tobytes(), quality=95)
    heic, jpeg = open_image(tmp_path / "a.heic"), open_image(tmp_path / "a.jpg")
    assert heic.mode == "RGB" and heic.size == jpeg.size == (20, 40)
    assert np.abs(np.asarray(heic, np.int16) - np.asarray(jpeg, np.int16)).mean() < 8
    assert heic.getpixel((15, 2))[0] > 200 and heic.getpixel((2, 2))[2] > 200
    assert np.array_equal(np.asarray(heic), np.asarray(open_image_bytes((tmp_path / "a.heic").read_bytes())))


def test_one_pixel_image_is_fine(tmp_path):
    p = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(p)
    assert open_image(p).size == (1, 1)


def test_decompression_bomb_is_refused(tmp_path):
    p = tmp_path / "bomb.png"
    Image.new("1", (10000, 10000)).save(p)
    assert p.stat().st_size < 200_000
    with pytest.raises(BadImageError, match="decompression bomb"):
        open_image(p)


def test_bytes_api_matches_file_api(tmp_path):
    p = tmp_path / "a.png"
    Image.new("RGB", (5, 7), (9, 8, 7)).save(p)
    assert np.array_equal(np.asarray(open_image(p)), np.asarray(open_image_bytes(p.read_bytes())))
    with pytest.raises(BadImageError, match="empty"):
        open_image_bytes(b"")


def test_linked_folders_are_walked_once_and_loops_end(tmp_path):
    """A linked attribute folder belongs to the collection (the dataset scan and `index build` both see it); a link
    back up the tree is listed as passed over instead of walked forever."""
    from conftest import make_dataset
    from lookalike.data import scan_dataset
    from lookalike.images import iter_image_files, scan_images

    make_dataset(tmp_path / "stash", per_attribute=5, kinds=("checks",))
    photos = make_dataset(tmp_path / "photos", per_attribute=5, kinds=("stripes", "dots"))
    os.symlink(tmp_path / "stash" / "checks", photos / "checks")
    os.symlink(photos, photos / "dots" / "loop")
    passed_over = []
    files = list(iter_image_files(photos, passed_over))
    assert len(files) == 15 and len(set(files)) == 15
    assert passed_over == [(photos / "dots" / "loop", "a link to a folder this walk already covers")]
    assert sorted(a for _, a in scan_images(photos)) == ["checks"] * 5 + ["dots"] * 5 + ["stripes"] * 5
    assert scan_dataset(photos, progress=False).attributes == ["checks", "dots", "stripes"]


@pytest.mark.parametrize("values", [np.linspace(0.0, 1.0, 32 * 32), np.linspace(0, 2**20, 32 * 32)], ids=["float 0-1", "int32 past 16 bits"])
def test_float_and_32_bit_grey_tiffs_are_scaled_not_clipped(tmp_path, values):
    """Scientific and HDR-ish exports: a 0-1 float ramp must not come out black, nor a 32-bit ramp white."""
    img = Image.fromarray(values.reshape(32, 32).astype(np.float32 if values.max() <= 1 else np.int32))
    img.save(tmp_path / "ramp.tif")
    arr = np.asarray(open_image(tmp_path / "ramp.tif"), np.float64)[..., 0]
    assert arr.min() == 0 and arr.max() == 255 and abs(arr.mean() - 127.5) < 2
    assert np.all(np.diff(arr.ravel()) >= 0)
