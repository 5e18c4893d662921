"""Header-only reads for the review app: a worklist folder's studies (with refusals known from the header), and
the patient identifiers it masks.

Only DICOM headers are parsed (`stop_before_pixels`), so listing a folder of large studies stays fast.
Patient identifiers are read on demand, for display behind a deliberate toggle; they never enter
`ImageMeta`, logs or the review database.
"""

from __future__ import annotations

import hashlib
import logging
from io import BytesIO
from pathlib import Path

import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError

from medvit.data.dicom import (
    RADIOGRAPH_MODALITIES,
    UNCONFIRMED_MODALITIES,
    ImageMeta,
    check_chest_frontal,
    header_text,
)
from medvit.data.files import sniff_file, sniff_format
from medvit.errors import DatasetError, UnsupportedImageError

_log = logging.getLogger(__name__)

WORKLIST_COLUMNS = ("file", "format", "modality", "view", "body_part", "date", "uid", "refusal")
PATIENT_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber")
_DATE_TAGS = ("StudyDate", "SeriesDate", "AcquisitionDate")  # the first one set is the study's date
_HEADER_TAGS = ("Modality", "ViewPosition", "BodyPartExamined", "SOPInstanceUID", *_DATE_TAGS)


def list_worklist(folder: str | Path, limit: int = 1000) -> pd.DataFrame:
    """One row per file in `folder` (not recursive, hidden files left out), sorted by name, with header fields.

    `uid` is the key reviews are stored under (the SOP Instance UID, or the SHA-256 of a PNG/JPEG), so the queue
    can show which images are reviewed. `refusal` says why a file will not be scored when its header already
    tells (not an image, not a radiograph, a lateral view, another body part, an unreadable header); files are
    listed, never dropped, so nothing disappears from the queue silently.

    Raises:
        DatasetError: `folder` is not a readable directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"worklist folder not found: {folder}")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if len(paths) > limit:
        _log.warning("worklist %s: listing only the first %d files", folder, limit)
    return pd.DataFrame([_row(path) for path in paths[:limit]], columns=list(WORKLIST_COLUMNS))


def _row(path: Path) -> dict[str, str | None]:
    row: dict[str, str | None] = dict.fromkeys(WORKLIST_COLUMNS)
    row["file"] = path.name
    try:
        kind = sniff_file(path)
    except OSError as e:
        return row | {"refusal": f"cannot read the file ({type(e).__name__})"}
    if kind is None:
        return row | {"refusal": "not a DICOM, PNG or JPEG file"}
    row["format"] = kind
    if kind != "dicom":
        return row | {"uid": hashlib.sha256(path.read_bytes()).hexdigest()}
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
    except (InvalidDicomError, OSError, ValueError) as e:
        return row | {"refusal": f"unreadable DICOM header ({type(e).__name__})"}
    row |= {
        "modality": header_text(ds, "Modality"), "view": header_text(ds, "ViewPosition"),
        "body_part": header_text(ds, "BodyPartExamined"), "uid": header_text(ds, "SOPInstanceUID"),
        "date": _date(next(filter(None, (header_text(ds, t) for t in _DATE_TAGS)), None)),
    }  # fmt: skip
    return row | {"refusal": header_refusal(row["modality"], row["view"], row["body_part"])}


def header_refusal(modality: str | None, view: str | None, body_part: str | None) -> str | None:
    """Why the reader will refuse an image with these header values (None: nothing to refuse from the header)."""
    if (modality or "").upper() not in RADIOGRAPH_MODALITIES | UNCONFIRMED_MODALITIES:
        return f"Modality {modality}: not a radiograph"
    try:
        check_chest_frontal(ImageMeta(source="dicom", rows=0, columns=0, modality=modality, view_position=view,
                                      body_part=body_part))  # fmt: skip
    except UnsupportedImageError as e:
        return str(e)
    return None


def patient_identifiers(data: bytes) -> dict[str, str]:
    """Patient name, ID, birth date, sex and accession number from a DICOM's header ({} for PNG/JPEG)."""
    if sniff_format(data) != "dicom":
        return {}
    try:
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=list(PATIENT_TAGS))
    except (InvalidDicomError, OSError, ValueError):
        return {}
    return {tag: value for tag in PATIENT_TAGS if (value := header_text(ds, tag))}


def _date(value: str | None) -> str | None:
    """DICOM DA (YYYYMMDD) as ISO YYYY-MM-DD; anything else unchanged."""
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value
