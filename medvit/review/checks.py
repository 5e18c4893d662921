"""Checks on everything a review stores, so that nothing malformed or identifying reaches the database.

Every failure is a `MedvitError` starting "review not saved:" that names the field; the store writes nothing.
Images are keyed only by a DICOM UID (digits and dots) or a SHA-256 digest, so a patient name cannot be
smuggled in as the key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from medvit.errors import MedvitError
from medvit.evaluate.metrics import flagged
from medvit.review.tables import NOTE_MAX, REVIEWER_MAX

Verdict = Literal["agree", "disagree", "uncertain"]
VERDICTS: tuple[str, ...] = get_args(Verdict)
UidKind = Literal["sop_instance_uid", "sha256"]
UID_KINDS: tuple[str, ...] = get_args(UidKind)

_DICOM_UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # PS3.5 9.1: digits and dots, at most 64 chars
_HEX = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True)
class ShownFinding:
    """What the reviewer saw for one finding: calibrated probability, its threshold and the raw model output."""

    prob: float
    threshold: float
    prob_raw: float | None = None
    flag: bool | None = None  # shown as flagged (None: not recorded, i.e. prob >= threshold at the shown rounding)

    @property
    def flagged(self) -> bool:
        return bool(flagged(self.prob, self.threshold)) if self.flag is None else self.flag


def check_text(what: str, value: str, max_len: int, *, required: bool = True) -> str:
    value = (value or "").strip()
    if required and not value:
        raise MedvitError(f"review not saved: {what} is empty")
    if len(value) > max_len:
        raise MedvitError(f"review not saved: {what} is {len(value)} characters long (at most {max_len})")
    return value


def check_reviewer(reviewer: str) -> str:
    return check_text("reviewer name", reviewer, REVIEWER_MAX)


def check_note(note: str) -> str:
    return check_text("note", note, NOTE_MAX, required=False)


def is_dicom_uid(uid: str) -> bool:
    """Whether `uid` can key a review as a DICOM UID (ASCII digits and dots, at most 64 characters)."""
    return len(uid) <= 64 and _DICOM_UID.fullmatch(uid) is not None


def check_uid(uid: str, kind: str) -> str:
    """Only a DICOM UID or a SHA-256 hex digest is accepted, so nothing identifying can be stored as the key."""
    uid = (uid or "").strip()
    if kind == "sop_instance_uid":
        if not is_dicom_uid(uid):
            raise MedvitError(f"review not saved: {uid!r} is not a DICOM SOP Instance UID (digits and dots)")
    elif kind == "sha256":
        uid = uid.lower()
        if len(uid) != 64 or not _HEX.match(uid):
            raise MedvitError("review not saved: image hash must be a 64-character SHA-256 hex digest")
    else:
        raise MedvitError(f"review not saved: image_uid_kind {kind!r} is not one of {', '.join(UID_KINDS)}")
    return uid


def check_hash(value: str) -> str:
    value = (value or "").strip().lower()
    if not 8 <= len(value) <= 64 or not _HEX.match(value):
        raise MedvitError("review not saved: weights hash must be a hex digest (8-64 characters)")
    return value


def shown_json(shown: Mapping[str, ShownFinding]) -> dict[str, dict[str, Any]]:
    if not shown:
        raise MedvitError("review not saved: no findings were shown")
    out: dict[str, dict[str, Any]] = {}
    for finding, s in shown.items():
        values = {"prob": s.prob, "threshold": s.threshold, "prob_raw": s.prob_raw}
        for key, v in values.items():
            if v is None and key == "prob_raw":
                continue
            if v is None or not math.isfinite(float(v)) or not 0.0 <= float(v) <= 1.0:
                raise MedvitError(f"review not saved: {finding} {key}={v!r} is not a probability in [0, 1]")
        entry: dict[str, Any] = {k: None if v is None else float(v) for k, v in values.items()}
        if s.flag is not None:
            entry["flag"] = bool(s.flag)
        out[check_text("finding name", finding, 64)] = entry
    return out


def check_verdicts(verdicts: Mapping[str, str], shown: Mapping[str, ShownFinding]) -> dict[str, str]:
    if not verdicts:
        raise MedvitError("review not saved: choose agree / disagree / uncertain for at least one finding")
    for finding, verdict in verdicts.items():
        if verdict not in VERDICTS:
            raise MedvitError(
                f"review not saved: verdict {verdict!r} for {finding} is not one of {', '.join(VERDICTS)}"
            )
        if finding not in shown:
            raise MedvitError(f"review not saved: {finding} was not among the findings shown")
    return dict(verdicts)
