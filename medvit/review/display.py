"""What the review app's viewer draws: lossless pixel values, window presets, the saliency layer, metadata rows.

Presentation only: the model never sees these values (it reads `XrayImage.pixels` at the header's VOI),
so the reader can window freely without changing a number in the findings table.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from medvit.data.dicom import ImageMeta, XrayImage

SALIENCY_CMAP = "plasma"  # perceptually uniform, and no black end that reads as anatomy on a radiograph
OVERLAY_MAX_SIDE = 512  # a saliency map is a token grid upsampled: more pixels would add nothing
_SAMPLE = 4  # presets read every 4th row and column: percentiles do not need 3.6 M values

PixelType = Literal["uint8", "int16", "uint16", "float32"]
_INTEGER_TYPES: tuple[PixelType, ...] = ("uint8", "uint16", "int16")


@dataclass(frozen=True)
class PixelPayload:
    """An image's values as the viewer receives them, losslessly: a little-endian array, row by row.

    Uncompressed: zlib shrinks a noisy 15-bit radiograph by only ~15 % for ~0.5 s of CPU, and Streamlit
    sends a large unchanged element to the browser once, then only its hash.
    """

    data: bytes
    dtype: PixelType
    rows: int
    columns: int


@dataclass(frozen=True)
class Preset:
    """A window the reader can jump to, in the image's own value units; `key` is its keyboard shortcut."""

    key: str
    label: str
    center: float
    width: float


def modality_values(image: XrayImage) -> np.ndarray:
    """The values the viewer windows: DICOM modality values (after the modality LUT), or a PNG/JPEG's grey levels.

    PNG/JPEG pixels are their stored levels over 255 (8-bit) or 65535 (16-bit), so scaling back gives the
    file's own integers (colour reduced to luma keeps its fractions).
    """
    if image.raw is not None:
        return image.raw
    levels = image.pixels * np.float32(2 ** (image.meta.bits_stored or 8) - 1)
    rounded = np.rint(levels)
    return rounded if np.allclose(levels, rounded, rtol=0, atol=1e-3) else levels


def encode_pixels(values: np.ndarray) -> PixelPayload:
    """`values` in the smallest array type that holds them exactly (integers in 8 or 16 bits, else float32)."""
    flat = np.asarray(values, dtype=np.float32)
    dtype: PixelType = "float32"
    if np.array_equal(flat, np.rint(flat)):
        lo, hi = float(flat.min()), float(flat.max())
        dtype = next((t for t in _INTEGER_TYPES if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max), dtype)
    array = np.ascontiguousarray(flat.astype(np.dtype(dtype).newbyteorder("<")))
    return PixelPayload(array.tobytes(), dtype, int(flat.shape[0]), int(flat.shape[1]))


def window_presets(image: XrayImage, values: np.ndarray) -> list[Preset]:
    """The header's VOI (or the file's full range), then lung and mediastinum windows from this image's histogram.

    A radiograph's values have no fixed unit (unlike CT's Hounsfield units), so the lung window spans the darker
    60 % of the displayed values (1st-60th percentile: air-filled lung against soft tissue) and the mediastinum
    window the brighter 60 % (40th-99.5th: heart, mediastinum and bone). "Darker" follows the display, so
    MONOCHROME1 images (high values shown dark) are handled.
    """
    meta = image.meta
    if meta.window_center is not None and meta.window_width is not None:
        first = Preset("V", "Header VOI", float(meta.window_center), float(meta.window_width))
    elif image.raw is None:
        top = float(2 ** (meta.bits_stored or 8) - 1)
        first = Preset("V", "As stored", top / 2, top)
    else:
        lo, hi = float(values.min()), float(values.max())
        first = Preset("V", "Full range", (lo + hi) / 2, max(hi - lo, 1.0))
    shown = values[::_SAMPLE, ::_SAMPLE].astype(np.float64)
    shown = -shown if meta.inverted else shown  # increasing = brighter on screen
    q = np.quantile(shown, [0.01, 0.60, 0.40, 0.995])

    def preset(key: str, label: str, low: float, high: float) -> Preset:
        low, high = (-high, -low) if meta.inverted else (low, high)
        return Preset(key, label, (low + high) / 2, max(high - low, 1e-3))

    return [first, preset("L", "Lung", q[0], q[1]), preset("M", "Mediastinum", q[2], q[3])]


def overlay_size(rows: int, columns: int) -> tuple[int, int]:
    """The saliency layer's (H, W): the image's aspect, at most `OVERLAY_MAX_SIDE` on a side."""
    scale = min(1.0, OVERLAY_MAX_SIDE / max(rows, columns))
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def heat_layer(heat: np.ndarray, cutoff: float, opacity: float, cmap: str = SALIENCY_CMAP) -> bytes:
    """An RGBA PNG of a [0, 1] map: transparent below `cutoff`; above it, the colour scale spans [cutoff, 1]."""
    from matplotlib import colormaps

    cutoff = float(np.clip(cutoff, 0.0, 0.99))
    scaled = np.clip((heat - cutoff) / (1.0 - cutoff), 0.0, 1.0)
    rgba = colormaps[cmap](scaled)
    rgba[..., 3] = np.where((heat >= cutoff) & (heat > 0), float(np.clip(opacity, 0.0, 1.0)), 0.0)
    return _png(np.round(rgba * 255).astype(np.uint8))


def colour_scale(cmap: str = SALIENCY_CMAP) -> str:
    """The colour scale as a data: URL (a 256 x 1 gradient), for the legend beside the map."""
    from matplotlib import colormaps

    gradient = colormaps[cmap](np.linspace(0.0, 1.0, 256))[None, :, :3]
    return "data:image/png;base64," + base64.b64encode(_png(np.round(gradient * 255).astype(np.uint8))).decode()


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def compression_text(meta: ImageMeta) -> str:
    """Lossy or not, and why: a reader must know when fine detail may be a compression artefact."""
    return f"LOSSY ({meta.lossy})" if meta.lossy else "lossless"


def metadata_rows(meta: ImageMeta) -> dict[str, str]:
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
        "Compression": compression_text(meta), "Photometric": text(meta.photometric_interpretation),
        "Bits stored": text(meta.bits_stored), "Size": f"{meta.columns} × {meta.rows} px", "VOI applied": voi,
        "Study date": text(meta.study_date),
    }  # fmt: skip
