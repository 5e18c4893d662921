"""The PACS as the review app's worklist: CR/DX instances found by QIDO-RS, with their scoring status and the
highest flagged finding, opened by WADO-RS, and the reader's verdicts optionally stored back as a DICOM SR.

The scoring status comes from the `pacs_instances` rows `medvit watch` writes (`medvit.review.scoring`). The
highest flagged finding comes from the stored SR, read back once per SR (its UID never changes content), so
a reviewer can sort the worklist by urgency. No patient attribute is requested from the PACS for the listing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from io import BytesIO

import pandas as pd
import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from medvit.errors import PacsRequestError
from medvit.pacs.client import InstanceRef, PacsClient
from medvit.pacs.sr import ResultProvenance, build_sr, read_sr_findings, sr_uids
from medvit.review.scoring import PacsInstanceRow
from medvit.review.worklist import header_refusal

_log = logging.getLogger(__name__)

PACS_COLUMNS = ("date", "modality", "view", "status", "top_finding", "top_prob", "urgency", "uid", "study_uid",
                "series_uid", "refusal")  # fmt: skip
_SR_CACHE: dict[str, dict[str, dict[str, float | bool | str]]] = {}  # SR SOP UID -> its findings (immutable per UID)
_SR_LOCK = threading.Lock()


def pacs_listing(client: PacsClient, engine: Engine, weights_sha256: str, since: str | None = None) -> pd.DataFrame:
    """One row per CR/DX instance in the PACS, most urgent first (highest flagged probability past its threshold),
    then unscored, then the rest by date. `uid` is the SOP Instance UID (the review key).

    Raises:
        PacsError: the PACS cannot be reached or refuses the credentials.
    """
    refs = client.search_radiographs(since)
    with Session(engine) as session:
        rows = {
            r.sop_instance_uid: r
            for r in session.scalars(
                select(PacsInstanceRow).where(PacsInstanceRow.sop_instance_uid.in_([r.sop_uid for r in refs]))
            )
        }
    out = []
    for ref in refs:
        row = rows.get(ref.sop_uid)
        top = _top_finding(client, ref, row, weights_sha256)
        refusal = header_refusal(ref.modality, ref.view, ref.body_part)
        if row is not None and row.status == "refused":
            refusal = row.reason or "refused by the scoring service"
        out.append({
            "date": _date(ref.study_date), "modality": ref.modality, "view": ref.view,
            "status": row.status if row is not None else "not scored yet",
            "top_finding": top[0] if top else None, "top_prob": top[1] if top else None,
            "urgency": top[2] if top else None, "uid": ref.sop_uid, "study_uid": ref.study_uid,
            "series_uid": ref.series_uid, "refusal": refusal,
        })  # fmt: skip
    listing = pd.DataFrame(out, columns=list(PACS_COLUMNS))
    listing["_scored"] = listing["status"] == "scored"
    listing = listing.sort_values(["urgency", "_scored", "date"], ascending=[False, True, False], na_position="last",
                                  kind="stable")  # fmt: skip
    return listing.drop(columns="_scored").reset_index(drop=True)


def _top_finding(
    client: PacsClient, ref: InstanceRef, row: PacsInstanceRow | None, weights_sha256: str
) -> tuple[str, float, float] | None:
    """(finding, probability, probability - threshold) of the most flagged finding in the instance's SR.

    Only SRs of these weights are read (their series UID follows from the source and the weights); an SR that
    cannot be read leaves the row without a top finding rather than failing the listing.
    """
    if row is None or row.status != "scored" or not row.sr_sop_instance_uid:
        return None
    series_uid, sop_uid = sr_uids(ref.sop_uid, weights_sha256)
    if sop_uid != row.sr_sop_instance_uid:
        return None  # scored by other weights: their SR is not this model's result
    with _SR_LOCK:
        findings = _SR_CACHE.get(sop_uid)
    if findings is None:
        try:
            data = client.retrieve(InstanceRef(ref.study_uid, series_uid, sop_uid, "SR"))
            findings = read_sr_findings(pydicom.dcmread(BytesIO(data)))
        except PacsRequestError as e:
            _log.warning("SR %s not readable: %s", sop_uid, e)
            return None
        with _SR_LOCK:
            _SR_CACHE[sop_uid] = findings
    flagged = [(f, float(v["prob"]), float(v["prob"]) - float(v["threshold"])) for f, v in findings.items()
               if v.get("flag")]  # fmt: skip
    return max(flagged, key=lambda t: t[2]) if flagged else None


def retrieve(client: PacsClient, row: Mapping[str, str]) -> bytes:
    """The instance's DICOM bytes (WADO-RS), in the transfer syntax the PACS stored.

    Raises:
        PacsError: the PACS is unreachable; PacsRequestError: this instance could not be retrieved.
    """
    ref = InstanceRef(row["study_uid"], row["series_uid"], row["uid"], row.get("modality") or "")
    return client.retrieve(ref)


def store_review_sr(
    client: PacsClient, data: bytes, table: pd.DataFrame, provenance: ResultProvenance,
    verdicts: Mapping[str, str], review_key: str,
) -> str:  # fmt: skip
    """Store the reader's verdicts beside the model's numbers as an SR in the image's study; returns its UID.

    `review_key` (the review id and its edit count) makes the UIDs: storing the same review version twice
    replaces one object, and each edit is a new SR.

    Raises:
        PacsError, PacsRequestError: the PACS is unreachable or rejected the object.
    """
    source = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    uids = (generate_uid(entropy_srcs=["medvit-review-sr-series", source.SOPInstanceUID, review_key]),
            generate_uid(entropy_srcs=["medvit-review-sr", source.SOPInstanceUID, review_key]))  # fmt: skip
    sr = build_sr(source, table, provenance, verdicts=verdicts, uids=uids)
    client.store(sr)
    return str(sr.SOPInstanceUID)


def _date(value: str | None) -> str | None:
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value
