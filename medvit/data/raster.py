"""PNG/JPEG decoding for `read_image`: Pillow, with the size checked from the header before decoding."""

from __future__ import annotations

import struct
from collections.abc import Callable
from io import BytesIO

import numpy as np
from PIL import Image, ImageOps

from medvit.data.pixels import luma
from medvit.errors import ImageReadError, ImageTooLargeError

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def decode_raster(
    data: bytes, name: str, kind: str, check_size: Callable[[int, int], None]
) -> tuple[np.ndarray, int, tuple[str, ...]]:
    """Decode a PNG or JPEG to (HxW float32 in [0, 1], bit depth, warnings).

    PNG/JPEG are display images already, so they are scaled by their format's full range (255 or 65535),
    not stretched by min-max. `check_size(rows, columns)` raises before any pixel is decoded.
    """
    try:
        if kind == "png":  # Pillow's decoder does not check the IDAT checksums; verify() does
            with Image.open(BytesIO(data)) as im:
                check_size(im.height, im.width)
                im.verify()
        with Image.open(BytesIO(data)) as im:  # lazy: only the header has been parsed here
            check_size(im.height, im.width)
            im.load()
            img = ImageOps.exif_transpose(im)  # phone photos of films carry their rotation in EXIF
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{name}: {exc}") from exc
    # Pillow raises assorted types on broken files (IndexError for a PNG without IDAT, struct.error, ...)
    except (OSError, SyntaxError, ValueError, IndexError, EOFError, struct.error, ZeroDivisionError) as exc:
        raise ImageReadError(f"{name}: cannot decode this {kind.upper()} (truncated or corrupt?): {exc}") from exc
    warnings: list[str] = []
    if img.mode in _SIXTEEN_BIT_MODES:
        bits, grey = 16, np.asarray(img, dtype=np.float32)
    else:
        bits, grey = 8, _grey8(img, warnings, kind)
    pixels = np.clip(grey / np.float32(2**bits - 1), 0.0, 1.0).astype(np.float32)
    return pixels, bits, tuple(warnings)


def _grey8(img: Image.Image, warnings: list[str], kind: str) -> np.ndarray:
    """8-bit grey levels as float32; colour is reduced to luma, with a warning only if it was really colour."""
    if img.mode in ("L", "LA", "1"):
        return np.asarray(img.convert("L"), dtype=np.float32)
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])):
        warnings.append(f"colour {kind.upper()} ({img.mode}) converted to grayscale")
    return luma(rgb)
