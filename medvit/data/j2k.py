"""JPEG 2000 at the resolution the model needs: decode only the wavelet levels that are still needed.

A JPEG 2000 codestream is a resolution pyramid, so a 1955 x 1841 chest CR can be decoded at 1/2, 1/4, ...
of its size for a fraction of the full decode (OpenJPEG's `reduce`, exposed by Pillow). The model sees a
384 px (demo: 64 px) letterboxed image, so a level whose longer side is still >= that size loses nothing
the resize would keep. Full resolution is decoded only for display.

OpenJPEG decodes a codestream's code-blocks on `OPJ_NUM_THREADS` threads, which it reads from the environment at
each decode; Pillow offers no other way to ask. Importing this module sets it to the CPUs this process may use,
unless the user set it (RG1_J2KR at level 1 on 2 cores: ~175 -> ~115 ms, the same pixels). It is set once, at
import, because changing the environment while another thread decodes is not thread-safe in C.
"""

from __future__ import annotations

import logging
import math
import os
from io import BytesIO

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.uid import JPEG2000, UID, JPEG2000Lossless

_log = logging.getLogger(__name__)

J2K_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000})
THREADS_ENV = "OPJ_NUM_THREADS"
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # not on macOS
os.environ.setdefault(THREADS_ENV, str(_CPUS))
# The deepest reduction whose model input still matches full decode + area resize (mean |diff| of the normalised
# input <= 0.02, about one 8-bit grey level), measured on pydicom-data's RG1_J2KR/J2KI (1955 x 1841) and
# RG3_J2KR/J2KI (1760 x 1760) at 384, 224 and 64 px: level 1 <= 0.006, level 2 0.012-0.016, level 3 0.018-0.033,
# level 4 0.037-0.070. The 5/3 and 9/7 wavelet low-passes are not the area filter, and the gap grows per level.
MAX_LEVEL = 2


_SOC_SIZ = b"\xff\x4f\xff\x51"  # start of codestream, then the image and tile size marker
_COD, _SOT = 0xFF52, 0xFF90


def cod_segment(frame: bytes) -> bytes | None:
    """The main header's COD marker segment, from its marker on; None without one (or truncated).

    Bytes 9 and 13 are the number of wavelet decomposition levels and the transform (0: irreversible 9/7):
    marker(2) Lcod(2) Scod(1) SGcod(4) levels(1) code-block w(1) h(1) style(1) transform(1).
    """
    start = frame.find(_SOC_SIZ)
    if start < 0:
        return None
    pos = start + 2
    while pos + 4 <= len(frame):
        marker = int.from_bytes(frame[pos : pos + 2], "big")
        length = int.from_bytes(frame[pos + 2 : pos + 4], "big")
        if marker == _COD:
            segment = frame[pos : pos + 2 + length]
            return segment if len(segment) >= 14 else None
        if marker == _SOT:  # tile data starts: the main header had no COD
            return None
        pos += 2 + length
    return None


def reduction_level(rows: int, columns: int, min_side: int) -> int:
    """The coarsest level (at most `MAX_LEVEL`) whose longer side is still >= `min_side` (0: decode in full)."""
    level = 0
    while level < MAX_LEVEL and math.ceil(max(rows, columns) / (2 << level)) >= min_side:
        level += 1
    return level


def decode_reduced(ds: Dataset, syntax: UID, min_side: int) -> tuple[np.ndarray, int] | None:
    """Single-frame greyscale JPEG 2000 pixels at the coarsest sufficient level, and that level.

    The level is capped at the decomposition levels the codestream was written with (its COD marker), since
    OpenJPEG cannot go below them. Returns None when the full decode should be used: not J2K, colour, signed,
    already small, or a codestream that cannot be reduced; the caller's full decode then reports any real
    corruption.
    """
    if syntax not in J2K_SYNTAXES or int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.PixelRepresentation) != 0:
        return None
    rows, columns = int(ds.Rows), int(ds.Columns)
    level = reduction_level(rows, columns, min_side)
    if level == 0:
        return None
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=1)
        cod = cod_segment(frame)
        level = min(level, cod[9]) if cod is not None else level
        if level == 0:
            return None
        with Image.open(BytesIO(frame)) as im:
            # Pillow sizes a reduced image by rounding, OpenJPEG by the ceiling (1841 / 4: 460 against 461), and
            # a buffer of the wrong size is refused. Declaring the size as a multiple of 2**level makes Pillow's
            # rounding land on OpenJPEG's ceiling; `_size` is how Pillow's own plugins declare it.
            power = 1 << level
            im._size = (math.ceil(im.size[0] / power) * power, math.ceil(im.size[1] / power) * power)
            im.reduce = level  # type: ignore[method-assign,assignment]  # Jpeg2KImageFile's reduce property
            im.load()
            arr = np.asarray(im)
    except Exception as exc:  # noqa: BLE001 - any failure means: decode in full, which names real errors
        _log.debug("reduced JPEG 2000 decode failed, decoding in full: %s", exc)
        return None
    expected = (math.ceil(rows / (1 << level)), math.ceil(columns / (1 << level)))
    if arr.shape != expected:
        _log.debug("reduced JPEG 2000 decode gave %s, expected %s: decoding in full", arr.shape, expected)
        return None
    bits = int(ds.BitsStored)
    if arr.dtype == np.uint16 and bits < 16:
        arr = arr >> (16 - bits)  # Pillow scales a `bits`-deep codestream up to 16 bits (I;16); undo it
    if int(arr.max(initial=0)) >= 1 << bits:  # values outside BitsStored: not what the header describes
        return None
    return arr.astype(np.uint16 if int(ds.BitsAllocated) > 8 else np.uint8, copy=False), level
