"""What the review app draws from an image: re-windowed display pixels and the metadata panel.

Presentation only: the model never sees these pixels (it reads `XrayImage.pixels` at the header's VOI),
so the reader can window freely without changing a number in the findings table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medvit.data.dicom import XrayImage, apply_window

DISPLAY_MAX_SIDE = 1024


@dataclass(frozen=True)
class WindowDefaults:
    """Slider set-up for re-windowing: the values to window, their range and the header's VOI."""

    values: np.ndarray
    low: float
    high: float
    center: float
    width: float
    base_invert: bool  # MONOCHROME1 / INVERSE: inverted already in the default display


def window_defaults(image: XrayImage) -> WindowDefaults:
    """DICOM: modality values and the VOI the reader applied; PNG/JPEG: their 0-255 display values."""
    if image.raw is not None:
        raw = image.raw
        low, high = float(raw.min()), float(raw.max())
        center = image.meta.window_center if image.meta.window_center is not None else (low + high) / 2
        width = image.meta.window_width if image.meta.window_width is not None else max(high - low, 1.0)
        return WindowDefaults(raw, low, high, float(center), float(width), image.meta.inverted)
    return WindowDefaults(image.pixels * 255.0, 0.0, 255.0, 127.5, 255.0, False)


def display_pixels(
    image: XrayImage, center: float, width: float, invert: bool, defaults: WindowDefaults | None = None
) -> np.ndarray:
    """The image as the reader wants to see it, at most `DISPLAY_MAX_SIDE` pixels on a side.

    At the header's own VOI the reader's pixels are shown unchanged (this also covers VOI LUT tables,
    which a linear window only approximates); otherwise `apply_window` re-windows the modality values.
    `defaults` is `window_defaults(image)` when the caller already has it (it costs full-resolution passes).
    """
    d = defaults if defaults is not None else window_defaults(image)
    if np.isclose(center, d.center) and np.isclose(width, d.width):
        pixels = 1.0 - image.pixels if invert else image.pixels
    else:
        pixels = apply_window(d.values, center, max(width, 1.0), invert=d.base_invert != invert)
    return downscale(pixels, DISPLAY_MAX_SIDE)


def downscale(pixels: np.ndarray, max_side: int) -> np.ndarray:
    """Area-style (antialiased) downscale so the longest side is at most `max_side`; float32 in [0, 1]."""
    h, w = pixels.shape
    scale = max_side / max(h, w)
    if scale >= 1:
        return pixels.astype(np.float32, copy=False)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    t = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0]
    return out.clamp(0, 1).numpy()


def metadata_rows(meta: Any) -> dict[str, str]:
    """The metadata panel of one image (`ImageMeta`), as label -> text; no patient identifiers."""
    from pydicom.uid import UID

    def text(value: object) -> str:
        return "not given" if value in (None, "") else str(value)

    spacing = "not given"
    if meta.pixel_spacing:
        spacing = f"{meta.pixel_spacing[0]:.4g} × {meta.pixel_spacing[1]:.4g} mm ({meta.pixel_spacing_source})"
    syntax = text(meta.transfer_syntax)
    if meta.transfer_syntax:
        name = UID(meta.transfer_syntax).name
        syntax = f"{name} ({meta.transfer_syntax})" if name != meta.transfer_syntax else syntax
    voi = meta.voi_source
    if meta.window_center is not None and meta.window_width is not None:
        voi = f"C {meta.window_center:g} / W {meta.window_width:g} ({meta.voi_source})"
    return {
        "Format": meta.source.upper(), "Modality": text(meta.modality), "View position": text(meta.view_position),
        "Body part": text(meta.body_part), "Pixel spacing": spacing, "Transfer syntax": syntax,
        "Photometric": text(meta.photometric_interpretation), "Bits stored": text(meta.bits_stored),
        "Size": f"{meta.columns} × {meta.rows} px", "VOI applied": voi, "Study date": text(meta.study_date),
    }  # fmt: skip
