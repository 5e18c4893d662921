"""Whether a DICOM's pixels went through lossy compression, so a reader knows what they are looking at.

Three sources of evidence, any one of which is enough:
* LossyImageCompression (0028,2110) "01": the header says the image was lossy-compressed at some point,
  even if it is stored uncompressed now;
* a transfer syntax that is always lossy (baseline/extended JPEG, JPEG-LS near-lossless, MPEG/HEVC);
* a JPEG 2000 codestream coded with the irreversible 9/7 wavelet (its COD marker), which the general
  "JPEG 2000" syntax allows without the header saying so.
"""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    UID,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    MPEGTransferSyntaxes,
)

from medvit.data.j2k import cod_segment

_log = logging.getLogger(__name__)

_ALWAYS_LOSSY = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, *MPEGTransferSyntaxes})
_MAYBE_LOSSY_J2K = frozenset({JPEG2000, JPEG2000MC, HTJ2K})  # the codestream says which


def lossy_compression(ds: Dataset) -> str | None:
    """Why this DICOM's pixels are lossy, in a few words; None when nothing says they are."""
    if str(ds.get("LossyImageCompression", "")).strip() == "01":
        method = str(ds.get("LossyImageCompressionMethod", "")).strip()
        return f"LossyImageCompression 01{f' ({method})' if method else ''}"
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    if syntax in _ALWAYS_LOSSY:
        return f"{syntax.name} transfer syntax"
    if syntax in _MAYBE_LOSSY_J2K and "PixelData" in ds:
        try:
            frame = get_frame(ds.PixelData, 0, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1))
        except Exception as exc:  # noqa: BLE001 - an unreadable frame is reported by the decoder, not here
            _log.debug("cannot read the first JPEG 2000 frame to check its wavelet: %s", exc)
            return None
        if j2k_irreversible(frame):
            return f"{syntax.name} with the irreversible 9/7 wavelet"
    return None


def j2k_irreversible(frame: bytes) -> bool:
    """True when a JPEG 2000 codestream's COD marker selects the irreversible 9/7 wavelet (lossy)."""
    cod = cod_segment(frame)
    return cod is not None and cod[13] == 0
