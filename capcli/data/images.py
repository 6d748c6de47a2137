"""Safe, explicit image loading and preprocessing.

Every image the CLI reads goes through :func:`load_image`, which checks the
format against an allow-list and the pixel count against a cap *before* any
pixel data is decoded, applies EXIF orientation, and converts every Pillow
mode to RGB with an explicit rule (:func:`to_rgb`). Failures raise
:class:`ImageLoadError`, so callers can skip and count a bad file.
:func:`resize_center_crop` then produces the uint8 CLIP input tensor.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from capcli.errors import DataError

ALLOWED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"})

# Pillow's own default decompression-bomb threshold (Image.MAX_IMAGE_PIXELS):
# about a 9459x9459 image, or ~256 MiB of RGB pixels.
DEFAULT_MAX_PIXELS = 89_478_485

# Pillow names multi-picture JPEGs (most phone photos) "MPO"; they are JPEGs.
_FORMAT_ALIASES = {"MPO": "JPEG"}
_WHITE = (255, 255, 255)


class ImageLoadError(DataError):
    """An image that cannot be used; the message is ``"<file>: <reason>"`` on one line."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = " ".join(reason.split())  # one line, whatever Pillow said
        super().__init__(f"{path}: {self.reason}")


def _reason(exc: BaseException, max_pixels: int) -> str:
    """Turn a Pillow/OS exception into a short reason without repeating the path."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (cannot identify image file)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()  # e.g. "no such file or directory"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        # Pillow checks its own limit inside Image.open, before our check can
        # run; report the size against our cap so both paths read the same.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        if found and int(found[1]) > max_pixels:
            return f"{found[1]} pixels exceeds the cap of {max_pixels}"
        return f"decompression bomb ({exc})"
    return f"corrupt or truncated image ({str(exc) or type(exc).__name__})"


def load_image(
    source: str | os.PathLike[str] | bytes | BinaryIO,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Load one image safely and return it as a fully decoded RGB image.

    Args:
        source: A path, the encoded file bytes, or a binary file object
            (which is read but not closed).
        max_pixels: Largest allowed width*height, checked before decoding.
        name: What to call the image in error messages; defaults to the path,
            or ``"<bytes>"``/``"<stream>"`` for other sources.

    Returns:
        A new RGB ``PIL.Image.Image`` not tied to any open file.

    Raises:
        ImageLoadError: Missing, disallowed, oversized, corrupt or truncated image.
    """
    if isinstance(source, (str, os.PathLike)):
        label, fp = name or os.fspath(source), source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        label, fp = name or "<bytes>", io.BytesIO(source)
    else:
        label, fp = name or "<stream>", source
    try:
        with warnings.catch_warnings():
            # Pillow warns (not raises) between its threshold and twice it; make
            # that an error when our cap is no looser, so nothing slips through.
            pillow_cap = Image.MAX_IMAGE_PIXELS
            if pillow_cap is None or max_pixels <= pillow_cap:
                warnings.simplefilter("error", Image.DecompressionBombWarning)
            else:
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Image.open reads only the header; the `with` closes files we opened.
            with Image.open(fp) as img:
                fmt = _FORMAT_ALIASES.get(img.format or "", img.format or "unknown")
                if fmt not in ALLOWED_FORMATS:
                    allowed = ", ".join(sorted(ALLOWED_FORMATS))
                    reason = f"format {fmt} is not allowed (allowed: {allowed})"
                    raise ImageLoadError(label, reason)
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageLoadError(
                        label, f"{width * height} pixels exceeds the cap of {max_pixels}"
                    )
                # Animated GIF/WEBP open positioned on frame 0, so load() decodes
                # only the first frame; we never seek further.
                img.load()
                oriented = ImageOps.exif_transpose(img)  # always a new image
                return to_rgb(oriented)
    except ImageLoadError:
        raise
    except Exception as exc:
        # Pillow signals bad input with many exception types (OSError, SyntaxError,
        # ValueError, EOFError, struct.error, IndexError...); this block only runs
        # Pillow on untrusted bytes, so any failure here means "unusable image".
        raise ImageLoadError(label, _reason(exc, max_pixels)) from exc


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(gray.astype(np.uint8)).convert("RGB")  # 2-D uint8 is "L"


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB with an explicit rule per mode.

    Transparency is composited over white (a black background would turn
    transparent logos into black squares); high-bit-depth grey is scaled by its
    bit depth rather than clipped, as a plain ``convert("L")`` would do.

    Args:
        img: A decoded image in any mode.

    Returns:
        An RGB image; ``img`` itself when it is already RGB without transparency.
    """
    mode = img.mode
    has_alpha = mode in ("LA", "RGBA", "RGBa", "PA")
    # Palette/grey/RGB images can mark a transparent colour via a tRNS chunk.
    if has_alpha or (mode in ("P", "L", "1", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", img.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img).astype(np.uint32)
        return _gray_to_rgb((arr + 128) // 257)  # 65535 -> 255, rounded
    if mode == "I":
        # 32-bit signed container; 16-bit data (old PNG/TIFF readers) is the
        # common case, so scale by 16 bits unless the values need 31.
        arr = np.asarray(img).astype(np.float64).clip(0, None)
        scale = 65535.0 if arr.max(initial=0) <= 65535 else float(2**31 - 1)
        return _gray_to_rgb(np.rint(arr * (255.0 / scale)))
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if arr.max(initial=0) <= 1.0:
            arr = arr.clip(0.0, 1.0) * 255.0  # normalised floats
        return _gray_to_rgb(np.rint(arr.clip(0.0, 255.0)))
    # 1, L, P (no transparency), CMYK (Pillow already un-inverts Adobe CMYK
    # JPEGs on decode), YCbCr, LAB, HSV and anything rarer: Pillow's own rule.
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (bicubic) and centre-crop, as CLIP does.

    The arithmetic matches torchvision's ``Resize(size)`` + ``CenterCrop(size)``
    so features agree with the reference CLIP preprocessing.

    Args:
        img: An image; converted with :func:`to_rgb` if not already RGB.
        size: Output side length in pixels.

    Returns:
        A contiguous ``uint8`` tensor of shape ``(3, size, size)``; normalisation
        happens later, on the device.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    img = to_rgb(img)
    width, height = img.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    # np.asarray exposes Pillow's bytes read-only; the single HWC->CHW copy
    # below yields a writable array, so torch shares it without another copy.
    chw = np.array(np.asarray(img).transpose(2, 0, 1), order="C")
    return torch.from_numpy(chw)
