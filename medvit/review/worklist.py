"""Header-only reads for the review app: a worklist folder's studies, and the patient identifiers it masks.

Only DICOM headers are parsed (`stop_before_pixels`), so listing a folder of large studies stays fast.
Patient identifiers are read on demand, for display behind a deliberate toggle; they never enter
`ImageMeta`, logs or the review database.
"""

from __future__ import annotations

import logging
from io import BytesIO
from pathlib import Path

import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError

from medvit.data.dicom import header_text
from medvit.data.files import image_files, sniff_file, sniff_format
from medvit.errors import DatasetError

_log = logging.getLogger(__name__)

WORKLIST_COLUMNS = ("file", "format", "modality", "view", "body_part", "date")
PATIENT_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber")
_DATE_TAGS = ("StudyDate", "SeriesDate", "AcquisitionDate")  # the first one set is the study's date
_HEADER_TAGS = ("Modality", "ViewPosition", "BodyPartExamined", *_DATE_TAGS)


def list_worklist(folder: str | Path, limit: int = 1000) -> pd.DataFrame:
    """One row per DICOM/PNG/JPEG file in `folder` (not recursive), sorted by name, with header fields.

    Files are those `medvit.data.files.image_files` picks (image suffix, or none); the format is detected
    from the content, and files that are not DICOM, PNG or JPEG inside are skipped.

    Raises:
        DatasetError: `folder` is not a readable directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"worklist folder not found: {folder}")
    rows: list[dict[str, str | None]] = []
    for path in image_files(folder, recursive=False):
        if len(rows) >= limit:
            _log.warning("worklist %s: listing only the first %d files", folder, limit)
            break
        try:
            kind = sniff_file(path)
        except OSError as e:
            _log.warning("worklist: cannot read %s: %s", path, e)
            continue
        if kind is None:
            continue
        row = {"file": path.name, "format": kind, "modality": None, "view": None, "body_part": None, "date": None}
        if kind == "dicom":
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
            except (InvalidDicomError, OSError, ValueError) as e:
                _log.warning("worklist: unreadable DICOM header %s: %s", path, e)
                continue
            row |= {
                "modality": header_text(ds, "Modality"), "view": header_text(ds, "ViewPosition"),
                "body_part": header_text(ds, "BodyPartExamined"),
                "date": _date(next(filter(None, (header_text(ds, t) for t in _DATE_TAGS)), None)),
            }  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows, columns=list(WORKLIST_COLUMNS))


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
