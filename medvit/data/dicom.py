"""Read a chest radiograph (DICOM, PNG or JPEG; a path or uploaded bytes) into display-ready floats.

`read_image` is the one entry point used by training, prediction, zero-shot scoring and the app, so every
caller sees the same pixels: bright bone, dark lungs, float32 in [0, 1]. The format is detected from the
content, never the file name. Problems a person can fix raise the typed errors of `medvit.errors` with a
message naming the file and what to do; `docs/inputs.md` lists them.

The DICOM pixel chain (decoding, modality LUT, VOI, inversion) lives in `_dicom_pixels.py`, PNG/JPEG
decoding in `_raster.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from medvit.data.files import looks_like_bare_dicom, sniff_format
from medvit.data.lossy import lossy_compression
from medvit.data.pixels import Rendered, apply_window, decode, one_line, render
from medvit.data.raster import decode_raster
from medvit.errors import ImageReadError, ImageTooLargeError, UnsupportedImageError

__all__ = ["MAX_PIXELS", "ImageMeta", "XrayImage", "apply_window", "check_chest_frontal", "read_image"]

_log = logging.getLogger(__name__)

MAX_PIXELS = 50_000_000  # decompression-bomb guard on Rows x Columns, checked before decoding
MAX_FILE_BYTES = 1 << 30  # a single-frame radiograph is < 200 MB even uncompressed
MIN_SIDE = 32  # smaller than any real radiograph (thumbnails, icons, test patterns)
UNIFORM_RANGE = 1 / 255  # display grey-level spread below which an image holds no anatomy (one 8-bit step)

RADIOGRAPH_MODALITIES = frozenset({"CR", "DX"})
# Secondary captures (often a screenshot of a radiograph) carry OT or nothing: read, with a warning.
UNCONFIRMED_MODALITIES = frozenset({"OT", ""})
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLO", "RLO"})
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "TORAX", "LUNG", "LUNGS"})

_PHOTOMETRIC = frozenset(
    {"MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"}
)
_DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
_USED_ELEMENTS = (  # every element read by validation, the pixel chain (with pydicom's) and the metadata
    "SOPClassUID", "SOPInstanceUID", "StudyDate", "Modality", "BodyPartExamined", "ViewPosition",
    "PhotometricInterpretation", "SamplesPerPixel", "PlanarConfiguration", "Rows", "Columns", "NumberOfFrames",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PixelData",
    "RescaleSlope", "RescaleIntercept", "ModalityLUTSequence", "VOILUTSequence", "WindowCenter", "WindowWidth",
    "VOILUTFunction", "PresentationLUTShape", "PresentationLUTSequence", "ImagerPixelSpacing", "PixelSpacing",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class ImageMeta:
    """What the app shows next to an image. Deliberately holds no patient identifiers."""

    source: str  # "dicom" | "png" | "jpeg"
    rows: int
    columns: int
    modality: str | None = None
    body_part: str | None = None
    view_position: str | None = None
    photometric_interpretation: str | None = None
    transfer_syntax: str | None = None  # the Transfer Syntax UID
    sop_instance_uid: str | None = None
    bits_stored: int | None = None
    pixel_spacing: tuple[float, float] | None = None  # mm, (row, column)
    pixel_spacing_source: str | None = None  # "ImagerPixelSpacing" | "PixelSpacing"
    window_center: float | None = None  # the VOI actually applied (min-max expressed as a window)
    window_width: float | None = None
    voi_source: str = "none"  # "voi_lut" | "window" | "minmax" | "none"
    inverted: bool = False  # MONOCHROME1 / INVERSE presentation handled
    decode_level: int = 0  # JPEG 2000 decoded at 1/2**level of full size (rows, columns and spacing are scaled)
    lossy: str | None = None  # why the pixels are lossy-compressed (medvit.data.lossy); None: nothing says so
    study_date: str | None = None
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists) for the app, logs and the review database."""
        out = dataclasses.asdict(self)
        out["pixel_spacing"] = list(self.pixel_spacing) if self.pixel_spacing else None
        out["warnings"] = list(self.warnings)
        return out


@dataclass(frozen=True)
class XrayImage:
    """A decoded radiograph: display pixels, safe metadata and, for DICOM, the values to re-window."""

    pixels: np.ndarray  # HxW float32 in [0, 1], display-ready: bright bone, dark lungs
    meta: ImageMeta
    raw: np.ndarray | None = None  # HxW float32 after the modality LUT, before VOI (DICOM only)


def read_image(
    src: str | os.PathLike[str] | bytes, *, max_pixels: int = MAX_PIXELS, name: str | None = None,
    min_side: int | None = None,
) -> XrayImage:
    """Read a DICOM, PNG or JPEG radiograph from a path or from bytes.

    DICOM follows the standard display chain: modality LUT, then the VOI LUT or the first window (min-max
    when the header has neither), then the INVERSE presentation shape / MONOCHROME1 inversion, scaled by
    the actual output range of that chain (never by 2**BitsStored, which is the container, not the data).
    PNG and JPEG are already display images: 8-bit is divided by 255 and 16-bit by 65535, their real
    output range, so a deliberately dark or low-contrast export is not stretched by min-max.

    The modality is checked here (CT, MR, US... are refused), but not the view or body part: the app still
    shows a lateral image with a warning, and the predictor calls `check_chest_frontal`.

    Args:
        src: a file path, or the file's bytes (an upload).
        max_pixels: refuse images whose header claims more pixels than this, before decoding them.
        name: how error messages and warnings name the file, e.g. an upload's original file name
            (default: the path, or "uploaded image" for bytes).
        min_side: the smallest longer side the caller needs (the model's input size): JPEG 2000 DICOMs are
            then decoded only down to the wavelet level that still gives it (None: full resolution, for display).

    Raises:
        ImageReadError: missing, empty, truncated or corrupt file, or not DICOM/PNG/JPEG.
        MissingDecoderError: compressed DICOM whose transfer syntax no installed plugin decodes.
        UnsupportedImageError: no pixel data, multi-frame, non-radiograph modality, colour model, tiny or uniform
            image (no anatomy).
        ImageTooLargeError: more than `max_pixels` pixels, or a file over `MAX_FILE_BYTES`.
    """
    data, name = _load(src, name)
    kind = sniff_format(data)
    if kind == "dicom":
        return _read_dicom(data, name, max_pixels, min_side, preamble=True)
    if kind in ("png", "jpeg"):
        return _read_raster(data, name, kind, max_pixels)
    if looks_like_bare_dicom(data):
        return _read_dicom(data, name, max_pixels, min_side, preamble=False)
    raise ImageReadError(f"{name}: not a DICOM, PNG or JPEG file (format detected from the content, not the name)")


def check_chest_frontal(meta: ImageMeta) -> None:
    """Refuse lateral/oblique views and body parts that are given and not the chest.

    A blank body part or view is accepted: PNG/JPEG and many DICOMs do not say.

    Raises:
        UnsupportedImageError: naming the view or body part found.
    """
    view = (meta.view_position or "").strip().upper()
    if view in LATERAL_VIEWS:
        raise UnsupportedImageError(
            f"ViewPosition {view}: a lateral or oblique view; the models read frontal (PA/AP) chest radiographs"
        )
    body = (meta.body_part or "").strip().upper()
    tokens = set("".join(c if c.isalnum() else " " for c in body).split())
    if tokens and not tokens & CHEST_BODY_PARTS:
        raise UnsupportedImageError(
            f"Modality {meta.modality or 'not given'}, BodyPartExamined {body}: not a chest radiograph"
        )


def _load(src: str | os.PathLike[str] | bytes, name: str | None) -> tuple[bytes, str]:
    """The file's bytes and a name for messages; size limits are checked before reading."""
    if isinstance(src, bytes | bytearray | memoryview):
        data, name = bytes(src), name or "uploaded image"
    else:
        path = Path(src)
        name = name or str(path)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ImageReadError(f"{name}: no such file") from None
        except OSError as exc:
            raise ImageReadError(f"{name}: cannot be read ({exc.strerror})") from exc
        if stat.S_ISDIR(st.st_mode):
            raise ImageReadError(f"{name}: is a directory, not an image file")
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
            raise ImageReadError(f"{name}: not a regular file (pipe, socket or device)")
        size = st.st_size
        if size > MAX_FILE_BYTES:
            raise ImageTooLargeError(f"{name}: {size / 2**20:.0f} MB is over the {MAX_FILE_BYTES >> 20} MB limit")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageReadError(f"{name}: cannot be read ({exc.strerror})") from exc
    if not data:
        raise ImageReadError(f"{name}: the file is empty (0 bytes)")
    if len(data) > MAX_FILE_BYTES:
        raise ImageTooLargeError(f"{name}: {len(data) / 2**20:.0f} MB is over the {MAX_FILE_BYTES >> 20} MB limit")
    return data, name


def _check_size(rows: int, columns: int, name: str, max_pixels: int) -> None:
    if rows * columns > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {rows} x {columns} = {rows * columns:,} pixels is over the limit of {max_pixels:,} "
            "(corrupt header or decompression bomb?); pass max_pixels to read larger images"
        )
    if min(rows, columns) < MIN_SIDE:
        raise UnsupportedImageError(f"{name}: {rows} x {columns} pixels is too small for a radiograph")


def _check_not_uniform(pixels: np.ndarray, name: str) -> None:
    """Refuse an image with no anatomy: blank, all-zero, one value everywhere, or RescaleSlope 0.

    Checked on the display pixels (after the whole chain), by the range of the central 99 % of grey levels
    so a few burnt-in label pixels do not make a blank image pass. A model scores such an image anyway,
    with findings flagged: the answer would be silent nonsense.
    """
    sample = pixels[:: max(1, pixels.shape[0] // 512), :: max(1, pixels.shape[1] // 512)]
    lo, hi = np.quantile(sample, [0.005, 0.995])
    if hi - lo < UNIFORM_RANGE:
        raise UnsupportedImageError(
            f"{name}: the image is uniform (no anatomy): 99% of its pixels lie within {255 * (hi - lo):.1f}/255 of "
            "one grey level after the display chain (blank export, all-zero pixels or RescaleSlope 0?)"
        )


def _read_dicom(data: bytes, name: str, max_pixels: int, min_side: int | None, *, preamble: bool) -> XrayImage:
    try:
        ds = pydicom.dcmread(BytesIO(data), force=not preamble)
    except Exception as exc:  # pydicom raises many types for malformed files
        raise ImageReadError(f"{name}: not a readable DICOM file (truncated or corrupt?): {one_line(exc)}") from exc
    return read_dataset(ds, name=name, max_pixels=max_pixels, min_side=min_side)


def read_dataset(ds: Dataset, *, name: str, max_pixels: int = MAX_PIXELS, min_side: int | None = None) -> XrayImage:
    """`read_image` of a DICOM dataset already parsed, such as a DICOMweb retrieval: its pixel data is decoded
    where it is, instead of being written out and parsed a second time (7 MB per chest CR). Same checks, same
    errors; `ds` itself is left as it was."""
    if len(ds) == 0:  # pydicom drops the whole dataset, with only a UserWarning, when the file ends mid-element
        raise ImageReadError(f"{name}: no DICOM elements could be read: the file is truncated or corrupt")
    try:  # pydicom parses element values lazily: make a damaged one that we use fail here, as a read error
        for keyword in _USED_ELEMENTS:
            ds.get(keyword)
        for keyword in ("MediaStorageSOPClassUID", "TransferSyntaxUID"):
            ds.file_meta.get(keyword)
    except Exception as exc:
        raise ImageReadError(f"{name}: corrupt DICOM header: {one_line(exc)}") from exc
    try:
        warnings = _validate(ds, name, max_pixels)
    except (ValueError, TypeError) as exc:  # a header number that is not one (e.g. Rows "abc")
        raise ImageReadError(f"{name}: corrupt DICOM header: {one_line(exc)}") from exc
    arr, level = decode(ds, name, min_side)
    try:
        rendered = render(ds, arr)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, NotImplementedError) as exc:
        raise ImageReadError(f"{name}: the header's pixel transforms cannot be applied: {one_line(exc)}") from exc
    _check_not_uniform(rendered.pixels, name)
    meta = _dicom_meta(ds, rendered, warnings + list(rendered.warnings), level)
    for warning in meta.warnings:
        _log.warning("%s: %s", name, warning)
    return XrayImage(pixels=rendered.pixels, meta=meta, raw=rendered.raw)


def _validate(ds: Dataset, name: str, max_pixels: int) -> list[str]:
    """Everything checkable from the header, before paying for decoding; returns warnings."""
    modality = (header_text(ds, "Modality") or "").upper()
    if "PixelData" not in ds:
        kind = _sop_class_name(ds)
        # A truncated file often parses up to an element boundary, without error: an image class, image
        # attributes or an unreadable SOP class mean the pixels were lost, not that there never were any.
        if kind is None or "Image Storage" in kind or "Rows" in ds:
            raise ImageReadError(f"{name}: {kind or 'DICOM'} without pixel data: the file is truncated or corrupt")
        raise UnsupportedImageError(f"{name}: no pixel data ({kind}, Modality {modality or 'not given'}): not an image")
    warnings = []
    if modality not in RADIOGRAPH_MODALITIES | UNCONFIRMED_MODALITIES:
        body = header_text(ds, "BodyPartExamined") or "not given"
        raise UnsupportedImageError(
            f"{name}: Modality {modality}, BodyPartExamined {body}: not a chest radiograph "
            "(medvit reads CR and DX radiographs, and OT secondary captures)"
        )
    if modality in UNCONFIRMED_MODALITIES:
        warnings.append(f"Modality {modality or 'not given'}: cannot confirm this is a radiograph")
    if str(ds.get("SOPClassUID", "")) == _DX_FOR_PROCESSING:
        warnings.append("DX 'For Processing' image: raw detector data, not processed for display")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise UnsupportedImageError(f"{name}: {frames} frames; medvit reads single-frame images (export one frame)")
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if not rows or not columns:
        raise ImageReadError(f"{name}: the header has no Rows/Columns (corrupt file?)")
    _check_size(int(rows), int(columns), name, max_pixels)
    photometric = header_text(ds, "PhotometricInterpretation")
    if photometric not in _PHOTOMETRIC:
        raise UnsupportedImageError(
            f"{name}: Photometric Interpretation {photometric or '(missing)'} is not supported "
            "(export the image as MONOCHROME2 or RGB)"
        )
    return warnings


def _sop_class_name(ds: Dataset) -> str | None:
    """Registered name of the SOP class (dataset or file meta), or None when neither is a known UID."""
    for value in (ds.get("SOPClassUID"), ds.file_meta.get("MediaStorageSOPClassUID")):
        uid = UID(str(value or ""))
        if uid and uid.name != str(uid):
            return uid.name
    return None


def _dicom_meta(ds: Dataset, rendered: Rendered, warnings: list[str], level: int = 0) -> ImageMeta:
    modality = header_text(ds, "Modality")
    spacing, spacing_source = _pixel_spacing(ds, modality, warnings)
    if spacing is not None:
        spacing = (spacing[0] * 2**level, spacing[1] * 2**level)
    return ImageMeta(
        source="dicom",
        rows=rendered.pixels.shape[0],
        columns=rendered.pixels.shape[1],
        modality=modality,
        body_part=header_text(ds, "BodyPartExamined"),
        view_position=header_text(ds, "ViewPosition"),
        photometric_interpretation=header_text(ds, "PhotometricInterpretation"),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        sop_instance_uid=header_text(ds, "SOPInstanceUID"),
        bits_stored=int(ds.BitsStored) if "BitsStored" in ds else None,
        pixel_spacing=spacing,
        pixel_spacing_source=spacing_source,
        window_center=rendered.window_center,
        window_width=rendered.window_width,
        voi_source=rendered.voi_source,
        inverted=rendered.inverted,
        decode_level=level,
        lossy=lossy_compression(ds),
        study_date=header_text(ds, "StudyDate"),
        warnings=tuple(warnings),
    )


def _pixel_spacing(
    ds: Dataset, modality: str | None, warnings: list[str]
) -> tuple[tuple[float, float] | None, str | None]:
    """Spacing in mm and the tag it came from.

    For CR/DX, ImagerPixelSpacing (at the detector) is the defined attribute; PixelSpacing there may be a
    calibrated or a copied value, so it is only the fallback.
    """
    tags = ["ImagerPixelSpacing", "PixelSpacing"]
    if modality not in RADIOGRAPH_MODALITIES:
        tags.reverse()
    for tag in tags:
        value = ds.get(tag)
        if value is None:
            continue
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            warnings.append(f"unreadable {tag} ignored")
            continue
        if np.isfinite([row, col]).all() and row > 0 and col > 0:
            return (row, col), tag
        warnings.append(f"{tag} {row:g}\\{col:g} is not a valid spacing: ignored")
    return None, None


def _read_raster(data: bytes, name: str, kind: str, max_pixels: int) -> XrayImage:
    pixels, bits, warnings = decode_raster(data, name, kind, lambda r, c: _check_size(r, c, name, max_pixels))
    _check_not_uniform(pixels, name)
    meta = ImageMeta(source=kind, rows=pixels.shape[0], columns=pixels.shape[1], bits_stored=bits, warnings=warnings,
                     lossy="JPEG file" if kind == "jpeg" else None)  # fmt: skip
    for warning in warnings:
        _log.warning("%s: %s", name, warning)
    return XrayImage(pixels=pixels, meta=meta, raw=None)


def header_text(ds: Dataset, keyword: str) -> str | None:
    """A header string, stripped; None when absent or blank."""
    value = ds.get(keyword)
    text = str(value).strip() if value is not None else ""
    return text or None
