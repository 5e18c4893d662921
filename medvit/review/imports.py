"""`medvit reviews import` / `export`: reviews made elsewhere (other tools, re-reads) in and out as CSV.

Columns: `image` (a path under the images folder, or an image key from an export: the SOP Instance UID or the
SHA-256 of the file), `finding` (a name or alias from `medvit.findings`), `present` (1, 0, or empty for
uncertain), `reviewer`, `reviewed_at` (ISO 8601; without an offset it is read as UTC).

An import is all or nothing: every row is checked and every image scored with the run's Predictor (which fills
in the raw and calibrated outputs, the threshold and the calibration version) before one transaction writes the
reviews. A bad row stops it with one line naming the row. Rows of the same image, reviewer and time become one
review, as if they had been saved from the app together; their source is "import".
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from medvit.data.dicom import read_image
from medvit.data.files import image_files, sniff_file
from medvit.errors import MedvitError
from medvit.findings import canonical
from medvit.inference.predictor import Prediction, Predictor
from medvit.review.checks import ShownFinding, check_reviewer, is_dicom_uid, shown_json
from medvit.review.labelled import labelled_reviews
from medvit.review.labels import Label, label_verdict
from medvit.review.store import ReviewStore
from medvit.review.tables import ReviewRow, VerdictRow

_log = logging.getLogger(__name__)

CSV_COLUMNS = ("image", "finding", "present", "reviewer", "reviewed_at")
_PRESENT: dict[str, Label | None] = {"1": "present", "0": "absent", "": None}
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
BATCH = 16


@dataclass(frozen=True)
class ImportRow:
    """One checked CSV row; `row` counts data rows from 1 (the header is line 1, so row N is line N + 1)."""

    row: int
    image: Path
    finding: str
    label: Label | None
    reviewer: str
    reviewed_at: datetime


@dataclass(frozen=True)
class ImportSummary:
    """What an import wrote."""

    n_rows: int
    n_reviews: int
    n_images: int
    calibration_version: str


def _where(row: int) -> str:
    return f"CSV row {row} (line {row + 1})"


def _uid_index(images_dir: Path) -> dict[str, Path]:
    """Image keys -> files under `images_dir`: SHA-256 of every image file, and SOP Instance UID of DICOMs."""
    import pydicom

    index: dict[str, Path] = {}
    for path in image_files(images_dir, recursive=True):
        index[hashlib.sha256(path.read_bytes()).hexdigest()] = path
        if sniff_file(path) == "dicom":
            uid = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).get("SOPInstanceUID")
            if uid:
                index[str(uid)] = path
    return index


class _Images:
    """Resolves the `image` column: a path under the folder, else an image key (built on first need)."""

    def __init__(self, images_dir: Path) -> None:
        self.root = images_dir.resolve()
        self._index: dict[str, Path] | None = None

    def resolve(self, value: str) -> Path:
        path = (self.root / value).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"image {value!r} is outside the images folder {self.root}")
        if path.is_file():
            return path
        if _SHA256.fullmatch(value) or is_dicom_uid(value):
            if self._index is None:
                self._index = _uid_index(self.root)
            found = self._index.get(value.lower() if _SHA256.fullmatch(value) else value)
            if found is not None:
                return found
        raise ValueError(f"image {value!r} not found under {self.root}")


def _reviewed_at(value: str) -> datetime:
    try:
        at = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"reviewed_at {value!r} is not an ISO 8601 date-time (e.g. 2024-05-01T14:30+02:00)") from None
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    if at > datetime.now(UTC):
        raise ValueError(f"reviewed_at {value!r} is in the future")
    return at.astimezone(UTC)


def _check(
    record: dict[str, str], images: _Images, findings: Sequence[str]
) -> tuple[Path, str, Label | None, str, datetime]:
    image = images.resolve((record["image"] or "").strip())
    finding = canonical((record["finding"] or "").strip())
    if finding not in findings:
        raise ValueError(f"finding {finding} is not predicted by this model ({', '.join(findings)})")
    present = (record["present"] or "").strip()
    if present not in _PRESENT:
        raise ValueError(f"present {present!r} must be 1, 0 or empty (uncertain)")
    return (
        image,
        finding,
        _PRESENT[present],
        check_reviewer(record["reviewer"] or ""),
        _reviewed_at(record["reviewed_at"] or ""),
    )


def read_rows(csv_path: str | os.PathLike, images_dir: str | os.PathLike, findings: Sequence[str]) -> list[ImportRow]:
    """Every row of the CSV, checked.

    Raises:
        MedvitError: missing file or columns, or the first bad row ("CSV row N (line N+1): problem").
    """
    csv_path, images_dir = Path(csv_path), Path(images_dir)
    if not images_dir.is_dir():
        raise MedvitError(f"--images {images_dir}: not a folder")
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise MedvitError(f"cannot read {csv_path}: {e}") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise MedvitError(f"{csv_path}: missing column(s) {', '.join(missing)}; expected {', '.join(CSV_COLUMNS)}")
    images, rows = _Images(images_dir), []
    seen: dict[tuple[Path, str, datetime, str], int] = {}
    for n, record in enumerate(reader, start=1):
        if None in record or any(v is None for v in record.values()):
            raise MedvitError(f"{csv_path}: {_where(n)}: {len(reader.fieldnames or [])} columns expected")
        try:
            row = ImportRow(n, *_check(record, images, findings))
        except (ValueError, MedvitError) as e:
            raise MedvitError(f"{csv_path}: {_where(n)}: {str(e).removeprefix('review not saved: ')}") from None
        key = (row.image, row.reviewer, row.reviewed_at, row.finding)
        if key in seen:
            raise MedvitError(f"{csv_path}: {_where(n)}: repeats row {seen[key]} (same image, finding, reviewer, time)")
        seen[key] = n
        rows.append(row)
    if not rows:
        raise MedvitError(f"{csv_path}: no rows to import")
    return rows


def _image_key(path: Path, data: bytes) -> tuple[str, str]:
    """The review database's image key, as the app computes it: the SOP Instance UID of a DICOM, else SHA-256."""
    meta = read_image(data, name=path.name).meta
    uid = meta.sop_instance_uid
    if meta.source == "dicom" and uid is not None and is_dicom_uid(uid):
        return uid, "sop_instance_uid"
    return hashlib.sha256(data).hexdigest(), "sha256"


def score_images(predictor: Predictor, rows: Sequence[ImportRow]) -> dict[Path, tuple[str, str, Prediction]]:
    """Each image's key and prediction; an unreadable or unsuitable image names the first row that uses it."""
    first = {r.image: r.row for r in reversed(rows)}
    inputs, keys = [], {}
    for path, row in sorted(first.items(), key=lambda kv: kv[1]):
        try:
            data = path.read_bytes()
            keys[path] = _image_key(path, data)
            inputs.append((path, predictor.preprocess(read_image(data, name=path.name, min_side=predictor.input_side))))
        except (OSError, MedvitError) as e:
            raise MedvitError(f"{_where(row)}: {e}") from None
    out = {}
    for i in range(0, len(inputs), BATCH):
        batch = inputs[i : i + BATCH]
        for (path, _), pred in zip(batch, predictor.predict_inputs(torch.stack([x for _, x in batch])), strict=True):
            out[path] = (*keys[path], pred)
    return out


def _groups(rows: Sequence[ImportRow]) -> Iterator[list[ImportRow]]:
    groups: dict[tuple[Path, str, datetime], list[ImportRow]] = {}
    for r in rows:
        groups.setdefault((r.image, r.reviewer, r.reviewed_at), []).append(r)
    yield from groups.values()


def _review_row(group: list[ImportRow], uid: str, kind: str, pred: Prediction, predictor: Predictor) -> ReviewRow:
    table = pred.table.set_index("finding")
    shown = {
        r.finding: ShownFinding(float(table.at[r.finding, "prob"]), float(table.at[r.finding, "threshold"]),
                                float(table.at[r.finding, "prob_raw"]), bool(table.at[r.finding, "flag"]))
        for r in group
    }  # fmt: skip
    first = group[0]
    return ReviewRow(
        created_at=first.reviewed_at, reviewer=first.reviewer, note="", image_uid=uid, image_uid_kind=kind,
        model_name=pred.model_name, weights_sha256=pred.weights_sha256, shown=shown_json(shown),
        calibration_version=pred.calibration_version, source="import",
        verdicts=[VerdictRow(finding=r.finding, verdict=label_verdict(r.label, shown[r.finding].flagged),
                             label=r.label) for r in group],
    )  # fmt: skip


def import_reviews(
    csv_path: str | os.PathLike, images_dir: str | os.PathLike, predictor: Predictor, store: ReviewStore
) -> ImportSummary:
    """Check, score and store every row of the CSV in one transaction (nothing is stored if anything fails).

    Raises:
        MedvitError: a bad row or image (named), or the database refused the write.
    """
    rows = read_rows(csv_path, images_dir, predictor.findings)
    scored = score_images(predictor, rows)
    reviews = [_review_row(g, *scored[g[0].image], predictor) for g in _groups(rows)]
    try:
        with Session(store.engine) as session, session.begin():
            session.add_all(reviews)
    except SQLAlchemyError as e:
        _log.exception("review import failed")
        raise MedvitError(
            f"nothing imported: the database {store.display_url} refused the write ({e.__class__.__name__})"
        ) from e
    _log.info("imported %d reviews (%d rows) from %s", len(reviews), len(rows), csv_path)
    return ImportSummary(len(rows), len(reviews), len(scored), predictor.calibration_version)


def export_reviews(store: ReviewStore, weights_sha256: str | None = None) -> str:
    """The reviews (of one model's weights, or all) as import CSV text, one row per finding verdict, oldest first.

    `image` is the image key (SOP Instance UID or SHA-256: the database stores no file names), which `import`
    finds again under an images folder.
    """
    reviews = labelled_reviews(store.engine, weights_sha256)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in reviews.itertuples(index=False):
        present = "" if math.isnan(r.label) else str(int(r.label))
        writer.writerow([r.image_uid, r.finding, present, r.reviewer, r.created_at.isoformat()])
    return buf.getvalue()
