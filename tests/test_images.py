"""Tests for capcli.data.images: safe loading, mode conversion, CLIP crop."""

from __future__ import annotations

import gc
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import png_claiming_size
from PIL import Image, ImageFile

from capcli.data.images import (
    ALLOWED_FORMATS,
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    load_image,
    resize_center_crop,
    to_rgb,
)
from capcli.errors import DataError


def _px(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    assert img.mode == "RGB"
    return img.getpixel(xy)


def _close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 1) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


# --- to_rgb -------------------------------------------------------------------


def test_constants() -> None:
    assert ALLOWED_FORMATS == {"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"}
    assert DEFAULT_MAX_PIXELS == 89_478_485


def test_rgb_is_returned_as_is() -> None:
    img = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_rgb(img) is img


def test_rgba_transparent_becomes_white_and_half_alpha_blends() -> None:
    img = Image.new("RGBA", (2, 1))
    img.putpixel((0, 0), (255, 0, 0, 0))
    img.putpixel((1, 0), (255, 0, 0, 128))
    out = to_rgb(img)
    assert _px(out, (0, 0)) == (255, 255, 255)
    assert _close(_px(out, (1, 0)), (255, 128, 128))


def test_la_over_white() -> None:
    out = to_rgb(Image.new("LA", (1, 1), (0, 0)))
    assert _px(out) == (255, 255, 255)


def test_palette_with_transparency_over_white() -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0  # index 0 (red) is transparent
    out = to_rgb(img)
    assert _px(out, (0, 0)) == (255, 255, 255)
    assert _px(out, (1, 0)) == (0, 0, 255)


def test_palette_with_transparency_through_png_file(tmp_path: Path) -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((1, 0), 1)
    path = tmp_path / "pal.png"
    img.save(path, transparency=0)
    out = load_image(path)
    assert _px(out, (0, 0)) == (255, 255, 255)  # black index is transparent
    assert _px(out, (1, 0)) == (0, 255, 0)


def test_palette_without_transparency() -> None:
    img = Image.new("P", (1, 1))
    img.putpalette([10, 20, 30] + [0] * 765)
    assert _px(to_rgb(img)) == (10, 20, 30)


def test_l_and_1() -> None:
    assert _px(to_rgb(Image.new("L", (1, 1), 100))) == (100, 100, 100)
    assert _px(to_rgb(Image.new("1", (1, 1), 1))) == (255, 255, 255)


def test_cmyk_zero_is_white() -> None:
    assert _px(to_rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 0)))) == (255, 255, 255)
    assert _px(to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0)))) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_16_bit_is_scaled_not_clipped(mode: str) -> None:
    img = Image.new(mode, (3, 1))
    for x, v in enumerate((0, 32896, 65535)):
        img.putpixel((x, 0), v)
    out = to_rgb(img)
    assert [_px(out, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_16_bit_png_file(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[65535, 32896]], dtype=np.uint16)).save(path)
    out = load_image(path)
    assert _px(out, (0, 0)) == (255, 255, 255)
    assert _px(out, (1, 0)) == (128, 128, 128)


def test_32_bit_int_mode_scaled() -> None:
    img = Image.new("I", (2, 1))
    img.putpixel((0, 0), 65535)
    img.putpixel((1, 0), -5)
    out = to_rgb(img)
    assert _px(out, (0, 0)) == (255, 255, 255)
    assert _px(out, (1, 0)) == (0, 0, 0)


def test_float_mode_unit_range_and_byte_range() -> None:
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert [_px(to_rgb(unit), (x, 0))[0] for x in range(3)] == [0, 128, 255]
    big = Image.fromarray(np.array([[-3.0, 100.0, 300.0]], dtype=np.float32))
    assert [_px(to_rgb(big), (x, 0))[0] for x in range(3)] == [0, 100, 255]


def test_ycbcr_and_hsv() -> None:
    assert _close(_px(to_rgb(Image.new("HSV", (1, 1), (0, 255, 255)))), (255, 0, 0))
    assert _close(_px(to_rgb(Image.new("YCbCr", (1, 1), (76, 85, 255)))), (255, 0, 0), 2)


# --- load_image ---------------------------------------------------------------


def test_loads_png_path_and_str(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGBA", (4, 3), (0, 0, 255, 255)).save(path)
    for src in (path, str(path)):
        out = load_image(src)
        assert out.mode == "RGB" and out.size == (4, 3)
        assert _px(out) == (0, 0, 255)


def test_bytes_and_stream_input() -> None:
    buf = io.BytesIO()
    Image.new("L", (5, 2), 7).save(buf, format="PNG")
    out = load_image(buf.getvalue())
    assert out.size == (5, 2) and _px(out) == (7, 7, 7)
    stream = io.BytesIO(buf.getvalue())
    assert load_image(stream).size == (5, 2)
    assert not stream.closed  # a caller's stream is theirs to close


def test_exif_orientation_6_transposes(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[274] = 6
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes())
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
    assert load_image(path).size == (20, 40)


def test_cmyk_jpeg_file(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(path)
    assert _close(_px(load_image(path)), (255, 255, 255), 2)


def test_multi_picture_jpeg_counts_as_jpeg(tmp_path: Path) -> None:
    # Phone cameras write MPO (JPEG + extra pictures); Pillow reports format "MPO".
    frames = [Image.new("RGB", (8, 6), (255, 0, 0)), Image.new("RGB", (8, 6), (0, 0, 255))]
    path = tmp_path / "phone.jpg"
    frames[0].save(path, format="MPO", save_all=True, append_images=frames[1:])
    with Image.open(path) as raw:
        assert raw.format == "MPO"
    assert _close(_px(load_image(path)), (255, 0, 0), 3)


@pytest.mark.parametrize("fmt, ext", [("ICO", "ico"), ("PPM", "ppm"), ("TGA", "tga")])
def test_disallowed_format_is_named(tmp_path: Path, fmt: str, ext: str) -> None:
    path = tmp_path / f"x.{ext}"
    Image.new("RGB", (16, 16)).save(path, format=fmt)
    with pytest.raises(ImageLoadError, match=rf"x\.{ext}: format {fmt} is not allowed") as info:
        load_image(path)
    assert "allowed: BMP, GIF, JPEG, PNG, TIFF, WEBP" in str(info.value)
    assert info.value.path == str(path)
    assert isinstance(info.value, DataError)


def test_pixel_cap_raises_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (20, 20)).save(path)

    decoded: list[Image.Image] = []

    def no_decode(self: Image.Image) -> None:
        decoded.append(self)
        raise AssertionError("pixel data was decoded")

    # ImageFile.load (the file decoder) overrides Image.load; patch both.
    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(ImageLoadError, match=r"big\.png: 400 pixels exceeds the cap") as info:
        load_image(path, max_pixels=100)
    assert info.value.reason == "400 pixels exceeds the cap of 100"
    assert decoded == []


def test_pillow_bomb_error_is_wrapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bomb.png"
    Image.new("RGB", (20, 20)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow itself now objects
    with pytest.raises(ImageLoadError, match=r"bomb\.png: .*decompression bomb"):
        load_image(path, max_pixels=10**6)  # our cap allows it, Pillow's does not
    with pytest.raises(ImageLoadError) as info:
        load_image(path, max_pixels=50)  # Pillow objects first; message uses our cap
    assert info.value.reason == "400 pixels exceeds the cap of 50"


def test_pillow_bomb_warning_never_escapes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "warn.png"
    Image.new("RGB", (20, 20)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 px: Pillow only warns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageLoadError, match=r"warn\.png: 400 pixels exceeds the cap of 200"):
            load_image(path, max_pixels=200)  # our cap is tighter: an error
        assert load_image(path, max_pixels=10**6).size == (20, 20)  # looser: honoured
    assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []


def test_under_cap_loads(tmp_path: Path) -> None:
    path = tmp_path / "ok.png"
    Image.new("RGB", (10, 10)).save(path)
    assert load_image(path, max_pixels=100).size == (10, 10)


@pytest.mark.parametrize("fmt, ext", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_file_raises(tmp_path: Path, fmt: str, ext: str) -> None:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, format=fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{ext}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_text("definitely not a picture\n")
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert str(info.value) == f"{path}: not an image (cannot identify image file)"


def test_name_is_used_for_bytes() -> None:
    with pytest.raises(ImageLoadError, match=r"^upload\.jpg: not an image"):
        load_image(b"hello", name="upload.jpg")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match=r"nope\.png: no such file"):
        load_image(tmp_path / "nope.png")


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as raw:
        assert raw.n_frames == 3
    assert _px(load_image(path)) == (255, 0, 0)


def test_animated_webp_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.webp"
    frames[0].save(path, save_all=True, append_images=frames[1:], lossless=True)
    assert _px(load_image(path)) == (255, 0, 0)


def test_no_unclosed_file_warnings(tmp_path: Path) -> None:
    good = tmp_path / "g.png"
    Image.new("RGB", (8, 8)).save(good)
    gif = tmp_path / "g.gif"
    Image.new("RGB", (8, 8)).save(gif, save_all=True, append_images=[Image.new("RGB", (8, 8))])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    ico = tmp_path / "i.ico"
    Image.new("RGB", (16, 16)).save(ico)
    noise = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    cut = tmp_path / "cut.png"
    cut.write_bytes((tmp_path / "noise.png").read_bytes()[:1000])
    # A leaked file warns from its finaliser, where "error" cannot raise, so
    # record the warnings and assert there are none.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(3):
            load_image(good)
            load_image(gif)
            for path, kw in ((bad, {}), (ico, {}), (cut, {}), (good, {"max_pixels": 1})):
                with pytest.raises(ImageLoadError):
                    load_image(path, **kw)
        gc.collect()  # unclosed files warn when collected
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


# --- resize_center_crop -------------------------------------------------------


@pytest.mark.parametrize("size_wh", [(300, 200), (200, 300), (224, 224), (50, 40)])
def test_resize_center_crop_shape_dtype(size_wh: tuple[int, int]) -> None:
    out = resize_center_crop(Image.new("RGB", size_wh, (9, 8, 7)), 224)
    assert out.shape == (3, 224, 224)
    assert out.dtype == torch.uint8
    assert out.is_contiguous()
    assert out[:, 100, 100].tolist() == [9, 8, 7]


def test_channels_first_order() -> None:
    out = resize_center_crop(Image.new("RGB", (10, 10), (1, 2, 3)), 10)
    assert out[0].unique().tolist() == [1] and out[2].unique().tolist() == [3]


@pytest.mark.parametrize("landscape", [True, False])
def test_center_content_is_kept(landscape: bool) -> None:
    # A 3:1 image, red in the middle third and blue at both ends.
    arr = np.zeros((100, 300, 3), dtype=np.uint8)
    arr[:, :, 2] = 255
    arr[:, 100:200] = (255, 0, 0)
    if not landscape:
        arr = arr.transpose(1, 0, 2).copy()
    out = resize_center_crop(Image.fromarray(arr), 32)
    # Shorter side 100 -> 32, so the crop is the middle ~third: all red.
    assert out[0].min() >= 200
    assert out[2].max() <= 60


def test_resize_center_crop_accepts_non_rgb() -> None:
    out = resize_center_crop(Image.new("RGBA", (20, 10), (0, 0, 0, 0)), 8)
    assert out.shape == (3, 8, 8) and int(out.min()) == 255


def test_resize_center_crop_rejects_bad_size() -> None:
    with pytest.raises(ValueError):
        resize_center_crop(Image.new("RGB", (4, 4)), 0)


def test_rows_are_rows() -> None:
    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    arr[:8] = (255, 0, 0)  # top half red
    arr[8:] = (0, 0, 255)  # bottom half blue
    out = resize_center_crop(Image.fromarray(arr), 16)
    assert out[:, 0, :].T.tolist() == [[255, 0, 0]] * 16
    assert out[:, 15, :].T.tolist() == [[0, 0, 255]] * 16


@pytest.mark.parametrize("pixels", [100_000_000, 200_000_000])
def test_default_cap_on_huge_header(tmp_path: Path, pixels: int) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(png_claiming_size(pixels // 10_000, 10_000))
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert str(info.value) == f"{path}: {pixels} pixels exceeds the cap of 89478485"
