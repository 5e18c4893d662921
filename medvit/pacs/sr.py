"""A scored radiograph as a DICOM Comprehensive SR, written with highdicom, that any PACS viewer can show.

The SR sits in the source image's study, in a series of its own, and references the source SOP instance as
evidence. Each finding is one NUM item (concept: the finding, code meaning its display name; value: the
calibrated probability, UCUM unit "1") with the operating threshold and the flag as its properties. The
model, the weights SHA-256, the calibration version and the inference engine travel with the numbers, and
a plain statement says the result is not for diagnostic use.

The SR's series and instance UIDs are derived from the source instance and the weights, so storing the
same result twice (a crash between STOW and the database commit) replaces one object instead of adding one.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from medvit.findings import display_name

__all__ = ["DISCLAIMER", "LOCAL_SCHEME", "WARNING_MEANING", "ResultProvenance", "build_sr", "read_sr_findings",
           "sr_texts", "sr_uids"]

LOCAL_SCHEME = "99MEDVIT"  # private coding scheme (PS3.16 8.2: "99" prefix) for concepts without a standard code
DISCLAIMER = (
    "Not for diagnostic use. Research software output (medvit), not reviewed by a clinician; "
    "probabilities are model estimates."
)
SERIES_NUMBER = 9901
WARNING_MEANING = "Image warning"  # the TEXT item carrying the prediction's warnings (sr_texts key)
SERIES_DESCRIPTION = "medvit findings (not for diagnostic use)"
REVIEWED_DESCRIPTION = "medvit findings with clinician verdicts"
REVIEWED_DISCLAIMER = (
    "Not for diagnostic use. Research software output (medvit) with a clinician's verdict on each finding judged; "
    "probabilities are model estimates."
)
VERDICT_MEANING = "Reviewer verdict"


@dataclass(frozen=True)
class ResultProvenance:
    """What produced the numbers: shown in the SR next to them."""

    model_name: str
    weights_sha256: str
    calibration_version: str  # e.g. "v2 platt sha256:3fa2..." (active version, method, hash of its file)
    engine: str  # the inference backend that ran (torch, onnx, ...)


# The SR's concepts are built once and shared by every SR (the written bytes are the same): building highdicom's
# CodedConcept datasets anew for each of an SR's ~50 items was a large part of the SR's cost.
@functools.cache
def _local(value: str, meaning: str):  # -> highdicom.sr.CodedConcept
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=LOCAL_SCHEME, meaning=meaning)


@functools.cache
def _coded(code: Code):  # -> highdicom.sr.CodedConcept
    from highdicom.sr import CodedConcept

    return CodedConcept.from_code(code)


def sr_uids(source_sop_uid: str, weights_sha256: str) -> tuple[str, str]:
    """(series UID, SOP instance UID) of the SR for this source image and these weights: deterministic."""
    return (
        generate_uid(entropy_srcs=["medvit-sr-series", source_sop_uid, weights_sha256]),
        generate_uid(entropy_srcs=["medvit-sr", source_sop_uid, weights_sha256]),
    )


def build_sr(source: Dataset, table: pd.DataFrame, provenance: ResultProvenance, warnings: Sequence[str] = (),
             *, verdicts: Mapping[str, str] | None = None, uids: tuple[str, str] | None = None) -> Dataset:
    """The SR for one scored image.

    Args:
        source: the scored DICOM instance (its header is enough: patient and study are copied from it).
        table: the Predictor's table (finding, prob, threshold, flag, ...).
        provenance: model, weights hash, calibration version and engine.
        warnings: the prediction's warnings (e.g. out of distribution), one TEXT item "Image warning" if any.
        verdicts: a clinician's verdict per finding (agree / disagree / uncertain), stored as a "Reviewer verdict"
            property of that finding; such an SR is a reviewed result, in a series of its own.
        uids: (series UID, SOP instance UID); default `sr_uids` (the model's result for this image and weights).

    Returns:
        A `highdicom.sr.ComprehensiveSR` (a pydicom Dataset), ready for STOW-RS.
    """
    from highdicom.sr import (
        CodeContentItem,
        ComprehensiveSR,
        ContainerContentItem,
        ContentSequence,
        ImageContentItem,
        NumContentItem,
        RelationshipTypeValues,
        TextContentItem,
    )

    contains, props = RelationshipTypeValues.CONTAINS, RelationshipTypeValues.HAS_PROPERTIES
    items = [
        TextContentItem(name=_local("DISCLAIMER", "Disclaimer"), value=REVIEWED_DISCLAIMER if verdicts else DISCLAIMER,
                        relationship_type=contains),
        TextContentItem(name=_coded(codes.DCM.AlgorithmName), value=provenance.model_name, relationship_type=contains),
        TextContentItem(name=_local("WEIGHTS_SHA256", "Model weights SHA-256"), value=provenance.weights_sha256,
                        relationship_type=contains),
        TextContentItem(name=_local("CALIBRATION", "Calibration version"), value=provenance.calibration_version,
                        relationship_type=contains),
        TextContentItem(name=_local("ENGINE", "Inference engine"), value=provenance.engine,
                        relationship_type=contains),
        *([TextContentItem(name=_local("IMAGE_WARNING", WARNING_MEANING), value="; ".join(warnings),
                           relationship_type=contains)] if warnings else []),
        ImageContentItem(name=_coded(codes.DCM.SourceOfMeasurement), referenced_sop_class_uid=source.SOPClassUID,
                         referenced_sop_instance_uid=source.SOPInstanceUID, relationship_type=contains),
    ]
    for row in table.itertuples(index=False):
        item = NumContentItem(name=_local(str(row.finding), display_name(str(row.finding))), value=float(row.prob),
                              unit=_coded(codes.UCUM.NoUnits), relationship_type=contains)
        item.ContentSequence = ContentSequence([
            NumContentItem(name=_local("THRESHOLD", "Operating threshold"), value=float(row.threshold),
                           unit=_coded(codes.UCUM.NoUnits), relationship_type=props),
            CodeContentItem(name=_local("FLAGGED", "Flagged"),
                            value=_coded(codes.SCT.Yes if row.flag else codes.SCT.No), relationship_type=props),
            *([TextContentItem(name=_local("VERDICT", VERDICT_MEANING), value=verdicts[row.finding],
                               relationship_type=props)] if verdicts and row.finding in verdicts else []),
        ])
        items.append(item)
    root = ContainerContentItem(name=_local("REPORT", "medvit chest radiograph findings"))
    root.ContentSequence = ContentSequence(items)
    series_uid, sop_uid = uids or sr_uids(source.SOPInstanceUID, provenance.weights_sha256)
    return ComprehensiveSR(
        evidence=[source], content=root, series_instance_uid=series_uid, series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer="medvit",
        series_description=REVIEWED_DESCRIPTION if verdicts else SERIES_DESCRIPTION,
        is_complete=True,
    )


def read_sr_findings(sr: Dataset) -> dict[str, dict[str, float | bool | str]]:
    """{finding: {"prob", "threshold", "flag"[, "verdict"]}} read back from a medvit SR (tests, audits, the app)."""
    out: dict[str, dict[str, float | bool | str]] = {}
    for item in sr.ContentSequence:
        if item.ValueType != "NUM" or item.ConceptNameCodeSequence[0].CodingSchemeDesignator != LOCAL_SCHEME:
            continue
        values: dict[str, float | bool | str] = {"prob": float(item.MeasuredValueSequence[0].NumericValue)}
        for prop in item.ContentSequence:
            code = _code_value(prop.ConceptNameCodeSequence[0])
            if code == "THRESHOLD":
                values["threshold"] = float(prop.MeasuredValueSequence[0].NumericValue)
            elif code == "FLAGGED":
                values["flag"] = prop.ConceptCodeSequence[0].CodeValue == codes.SCT.Yes.value
            elif code == "VERDICT":
                values["verdict"] = str(prop.TextValue)
        out[_code_value(item.ConceptNameCodeSequence[0])] = values
    return out


def _code_value(code: Dataset) -> str:
    """Code Value, or Long Code Value for values over 16 characters ("Pleural_Thickening")."""
    return str(code.get("CodeValue") or code.get("LongCodeValue") or "")


def sr_texts(sr: Dataset) -> Mapping[str, str]:
    """The SR's TEXT items by code meaning (model, weights, calibration, engine, disclaimer)."""
    return {item.ConceptNameCodeSequence[0].CodeMeaning: str(item.TextValue)
            for item in sr.ContentSequence if item.ValueType == "TEXT"}
