"""The DICOM pixel chain: decoding -> modality LUT -> VOI (LUT, window or min-max) -> inversion -> [0, 1].

Kept apart from `dicom.py` (file handling, validation, metadata) so that the decoding and display maths can
be read, tested and reused (the app's window sliders call `apply_window`) on their own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder, pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medvit.data.j2k import decode_reduced
from medvit.errors import ImageReadError, MissingDecoderError

# ITU-R BT.601 luma weights: the usual grey level of an RGB display image.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
# Decoding plugins, most trusted first. GDCM aborts the whole process (an uncaught C++ exception) on some
# corrupt JPEG streams, which would take the app down with it: it is used only when it is the sole plugin.
_PLUGIN_ORDER = ("pylibjpeg", "pillow", "pyjpegls", "pydicom")
_NATIVE_SYNTAXES = {  # (implicit VR, little endian) -> syntax, for datasets written without file meta
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}
_INSTALL_HINT = 'install the DICOM decoders with `pip install "medvit[dicom]"`'

_log = logging.getLogger(__name__)
# pydicom logs every failing decoder plugin's full traceback at ERROR (before raising), on this logger.
_PLUGIN_LOGGER = logging.getLogger("pydicom.pixels.decoders.base")
_plugin_log_lock = threading.Lock()
_plugin_log_users = 0


@dataclass(frozen=True)
class Rendered:
    """Result of the pixel chain, before it is wrapped into an `XrayImage`."""

    pixels: np.ndarray  # HxW float32 [0, 1], display-ready
    raw: np.ndarray  # HxW float32 after the modality LUT (grey level for colour images)
    window_center: float | None
    window_width: float | None
    voi_source: str  # "voi_lut" | "window" | "minmax" | "none"
    inverted: bool
    warnings: tuple[str, ...]


def decode(ds: Dataset, name: str, min_side: int | None = None) -> tuple[np.ndarray, int]:
    """Decode the single frame once (YBR becomes RGB), turning plugin and truncation failures into typed errors.

    With `min_side`, JPEG 2000 is decoded at the coarsest wavelet level whose longer side is still >= it;
    returns the pixels and that level (0: full resolution).
    """
    tsyntax = UID(str(ds.file_meta.get("TransferSyntaxUID") or _guess_syntax(ds, name)))
    if not tsyntax.is_transfer_syntax:
        raise ImageReadError(f"{name}: unknown transfer syntax {tsyntax}: convert the file to a standard syntax")
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:  # video and multi-component syntaxes: no pydicom plugin exists at all
        raise MissingDecoderError(
            f"{name}: no installed decoder for the transfer syntax {tsyntax.name} ({tsyntax}), and none is "
            f'available even with `pip install "medvit[dicom]"`: convert the file to an uncompressed syntax '
            "(e.g. `gdcmconv --raw in.dcm out.dcm`)"
        ) from None
    if not decoder.is_available:
        raise MissingDecoderError(
            f"{name}: no installed decoder for the transfer syntax {tsyntax.name} ({tsyntax}): {_INSTALL_HINT}"
        )
    if min_side:
        reduced = decode_reduced(ds, tsyntax, min_side)
        if reduced is not None:
            return reduced
    plugins = [p for p in _PLUGIN_ORDER if p in decoder.available_plugins] or list(decoder.available_plugins)
    failures = []
    with plugin_logs_to_debug():
        for plugin in plugins or [""]:  # native syntaxes need no plugin
            try:
                arr = pixel_array(ds, decoding_plugin=plugin)
                break
            except Exception as exc:  # noqa: BLE001 - decoder plugins raise many types; all are reported below
                failures.append(exc)
        else:
            raise ImageReadError(
                f"{name}: the {tsyntax.name} pixel data cannot be decoded (truncated or corrupt?): "
                f"{one_line(failures[0])}"
            ) from failures[0]
    expected = (int(ds.Rows), int(ds.Columns))
    if arr.shape[:2] != expected or arr.ndim not in (2, 3):
        raise ImageReadError(f"{name}: decoded pixels have shape {arr.shape}, the header says {expected}")
    return arr, 0


class _ToDebug(logging.Filter):
    """Re-log a pydicom plugin record on medvit's logger at DEBUG (seen with `-v`), and drop the original."""

    def filter(self, record: logging.LogRecord) -> bool:
        _log.debug("pydicom decoder plugin: %s", record.getMessage(), exc_info=record.exc_info)
        return False


_TO_DEBUG = _ToDebug()


@contextmanager
def plugin_logs_to_debug() -> Iterator[None]:
    """While decoding, route pydicom's plugin tracebacks to debug logging.

    A corrupt codestream would otherwise print two ERROR tracebacks before medvit's own one-line error; the
    CLI, the app and `watch` show that one line. Only the decoder plugins' logger is touched, and only for the
    duration of the decode (nested and concurrent decodes are counted), never logging as a whole.
    """
    global _plugin_log_users
    with _plugin_log_lock:
        _plugin_log_users += 1
        _PLUGIN_LOGGER.addFilter(_TO_DEBUG)
    try:
        yield
    finally:
        with _plugin_log_lock:
            _plugin_log_users -= 1
            if _plugin_log_users == 0:
                _PLUGIN_LOGGER.removeFilter(_TO_DEBUG)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (pydicom's list each plugin's failure on its own line), shortened."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _guess_syntax(ds: Dataset, name: str) -> UID:
    """The native syntax a file without file meta was parsed with, recorded so pydicom can decode it."""
    implicit, little = ds.original_encoding
    syntax = None if implicit is None or little is None else _NATIVE_SYNTAXES.get((implicit, little))
    if syntax is None:
        raise ImageReadError(f"{name}: the file has no Transfer Syntax UID and its encoding cannot be inferred")
    ds.file_meta.TransferSyntaxUID = syntax
    return syntax


def apply_window(
    raw: np.ndarray, center: float, width: float, invert: bool = False, *, function: str = "LINEAR"
) -> np.ndarray:
    """Window modality values into display values in [0, 1] (DICOM PS3.3 C.11.2.1.2).

    This is the same function `read_image` uses, so calling it with an image's `meta.window_center`,
    `meta.window_width` and `meta.inverted` reproduces `image.pixels` (for `voi_source` "window",
    "minmax" and "none"); the app's sliders re-window `image.raw` with it.

    Args:
        raw: modality values (`XrayImage.raw`).
        center: window centre, in modality units.
        width: window width, in modality units (>= 1 for LINEAR, > 0 otherwise).
        invert: flip the result (MONOCHROME1 / INVERSE presentation), applied after windowing.
        function: the DICOM VOI LUT Function: "LINEAR" (default), "LINEAR_EXACT" or "SIGMOID".

    Returns:
        HxW float32 array in [0, 1].
    """
    x = np.asarray(raw, dtype=np.float32)
    fn = function.strip().upper()
    if fn not in _VOI_FUNCTIONS:
        raise ValueError(f"VOI LUT function {function!r} is not one of {', '.join(_VOI_FUNCTIONS)}")
    if fn == "LINEAR" and width < 1 or fn != "LINEAR" and width <= 0:
        raise ValueError(f"window width {width} is too small for a {fn} window")
    if fn == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (x - np.float32(center)) / np.float32(width)))
    elif fn == "LINEAR_EXACT":
        out = (x - np.float32(center)) / np.float32(width) + np.float32(0.5)
    elif width == 1:  # LINEAR with width 1 is a threshold at center - 0.5
        out = (x > np.float32(center - 0.5)).astype(np.float32)
    else:  # in place after the first operation: the same float32 steps, one array instead of five (3.6 Mpx CR)
        out = np.subtract(x, np.float32(center - 0.5))
        out /= np.float32(width - 1)
        out += np.float32(0.5)
    out = out.astype(np.float32, copy=False)
    np.clip(out, 0.0, 1.0, out=out)
    if invert:
        np.subtract(np.float32(1.0), out, out=out)
    return out


def luma(rgb: np.ndarray) -> np.ndarray:
    """Grey level of an HxWx3 RGB array (BT.601 weights), as float32 in the input's units."""
    return np.asarray(rgb, dtype=np.float32) @ _LUMA


def minmax_window(lo: float, hi: float) -> tuple[float, float]:
    """The LINEAR window (center, width) that maps [lo, hi] exactly onto [0, 1].

    Expressing min-max and fixed-range scaling as a window lets `apply_window` reproduce every
    non-LUT rendering, so the app's sliders start from exactly what is displayed.
    """
    return (lo + hi + 1.0) / 2.0, hi - lo + 1.0


def render(ds: Dataset, arr: np.ndarray) -> Rendered:
    """Turn a decoded single-frame pixel array into display-ready floats, following the DICOM chain.

    Colour images (RGB, or YBR already converted to RGB by pydicom) become their luma, scaled by the
    full range of their bits: they are display images, like a PNG. Grayscale images go through the
    modality LUT, then the VOI LUT, else the first window, else min-max of the data, then the inversion.
    """
    if arr.ndim == 3:
        grey = luma(arr)
        center, width = minmax_window(0.0, float(2 ** int(ds.BitsStored) - 1))
        note = f"{ds.PhotometricInterpretation} image converted to grayscale"
        return Rendered(apply_window(grey, center, width), grey, center, width, "none", False, (note,))

    warnings: list[str] = []
    raw = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    invert = _is_inverted(ds, warnings)
    if _has_voi_lut(ds):
        try:
            pixels, center, width = _voi_lut(ds, raw)
            return Rendered(1.0 - pixels if invert else pixels, raw, center, width, "voi_lut", invert, tuple(warnings))
        except (ValueError, TypeError, IndexError, NotImplementedError) as exc:  # malformed table in the header
            warnings.append(f"unusable VOI LUT ignored ({exc}): window or min-max used")

    window = _first_window(ds, warnings)
    if window is not None:
        center, width, function = window
        pixels = apply_window(raw, center, width, invert, function=function)
        return Rendered(pixels, raw, center, width, "window", invert, tuple(warnings))

    lo, hi = float(raw.min()), float(raw.max())
    if hi == lo:
        warnings.append(f"every pixel has the same value ({lo:g}): the image is blank")
    center, width = minmax_window(lo, hi)
    return Rendered(apply_window(raw, center, width, invert), raw, center, width, "minmax", invert, tuple(warnings))


def _is_inverted(ds: Dataset, warnings: list[str]) -> bool:
    """MONOCHROME1 (low values bright) and an INVERSE presentation shape both mean one inversion.

    A MONOCHROME1 DX image *must* carry INVERSE (PS3.3 C.8.11.6.1.1), describing the same flip, so the two
    are not applied twice.
    """
    if "PresentationLUTSequence" in ds:
        warnings.append("Presentation LUT Sequence ignored (only the Presentation LUT Shape is applied)")
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    return ds.PhotometricInterpretation == "MONOCHROME1" or shape == "INVERSE"


def _has_voi_lut(ds: Dataset) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]


def _voi_lut(ds: Dataset, raw: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Apply the first VOI LUT, normalised by the range of the table's own entries.

    The LUT's nominal bit depth is often larger than what the table uses (a 16-bit LUT holding 0..4095);
    scaling by the entries' real range keeps the full display contrast.
    """
    n, first, _ = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor)
    n = n or 2**16
    # The LUT input is the integer modality output; clip first so pydicom's uint16 indexing cannot wrap.
    iv = np.clip(np.rint(raw), first, first + n - 1).astype(np.int64)
    out = apply_voi(iv, ds, 0).astype(np.float32)
    table = apply_voi(np.arange(first, first + n, dtype=np.int64), ds, 0)
    lo, hi = float(table.min()), float(table.max())
    pixels = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    # The centre/width reported (and used to seed the app's sliders) is the header window if any,
    # else the LUT's input domain.
    header = _first_window(ds, [])
    center, width = (header[0], header[1]) if header else minmax_window(float(first), float(first + n - 1))
    return pixels.astype(np.float32), center, width


def _first_window(ds: Dataset, warnings: list[str]) -> tuple[float, float, str] | None:
    """The first (Window Center, Window Width, VOI LUT Function) of the header, or None if absent/unusable."""
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    try:
        center = float(_first(ds.WindowCenter))  # type: ignore[arg-type]
        width = float(_first(ds.WindowWidth))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        warnings.append("unreadable Window Center/Width ignored: min-max scaling used")
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in _VOI_FUNCTIONS:
        warnings.append(f"unknown VOI LUT Function {function!r}: LINEAR window used")
        function = "LINEAR"
    elif function != "LINEAR":
        warnings.append(f"VOI LUT Function {function}: pass function={function!r} to apply_window to re-window")
    if not np.isfinite([center, width]).all() or width < 1 and function == "LINEAR" or width <= 0:
        warnings.append(f"invalid window (center {center:g}, width {width:g}) ignored: min-max scaling used")
        return None
    return center, width, function


def _first(value: object) -> object:
    """First item of a multi-valued element (several windows may be offered), or the value itself."""
    if isinstance(value, str | bytes):
        return value
    try:
        return next(iter(value))  # type: ignore[call-overload]
    except TypeError:
        return value
