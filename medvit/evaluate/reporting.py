"""Which findings a run may report: a flag needs a calibration that follows the model and evidence of skill.

A calibrator that maps every logit to one value (Platt slope 0, a flat isotonic fit) destroys the model's
ranking: every image gets the same probability, and with the threshold chosen at that value every image is
flagged. A finding whose model-card AUROC shows no skill (at most `NO_SKILL_AUROC` with a confidence interval
that includes 0.5, or no interval to tell) has nothing to flag either. Both are "not reported": the number
is still shown, greyed, with the reason, and the finding is never flagged. `medvit predict`, the app and the
DICOM SR all read this decision from the Predictor's table (columns `reported` and `reason`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvit._io import read_json
from medvit.errors import MedvitError
from medvit.evaluate.calibration import Calibration
from medvit.evaluate.calibrators import Calibrator, Isotonic, Platt, Temperature
from medvit.runs import METRICS

_log = logging.getLogger(__name__)

NO_SKILL_AUROC = 0.6  # at or below this AUROC, a finding must show skill through its confidence interval
_FLAT = 1e-9  # probability spread below which a calibrator is constant


@dataclass(frozen=True)
class FindingCard:
    """One finding's model-card evidence from the run's metrics.json."""

    auroc: float | None = None
    auroc_ci: tuple[float, float] | None = None
    ece: float | None = None
    n_pos: int | None = None


@dataclass(frozen=True)
class ModelCard:
    """The run's evaluation as the app and the predictor need it (metrics.json, read once)."""

    findings: dict[str, FindingCard] = field(default_factory=dict)
    mean_auroc: float | None = None
    mean_auroc_ci: tuple[float, float] | None = None
    n_images: int | None = None
    split: str | None = None  # which labelled split the numbers come from ("val": held out from training)


def read_card(run_dir: str | Path) -> ModelCard | None:
    """The run's model card (None when the run was never evaluated or metrics.json is unreadable)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return None
    try:
        doc = read_json(path)
        findings = {
            name: FindingCard(auroc=_num(m.get("auroc")), auroc_ci=_ci(m.get("auroc_ci")), ece=_num(m.get("ece")),
                              n_pos=m.get("n_pos"))
            for name, m in doc["findings"].items()
        }  # fmt: skip
        evaluation = doc.get("evaluation") or {}
        return ModelCard(findings, _num(doc.get("mean_auroc")), _ci(doc.get("mean_auroc_ci")), doc.get("n_images"),
                         evaluation.get("split") if isinstance(evaluation, dict) else None)  # fmt: skip
    except (MedvitError, KeyError, TypeError, AttributeError, ValueError) as e:
        _log.warning("ignoring unreadable model card metrics %s: %s", path, e)
        return None


def constant_reason(cal: Calibrator) -> str | None:
    """Why this calibrator gives every image the same probability (None when it follows the logit)."""
    if isinstance(cal, Platt) and cal.a == 0:
        return "calibration is constant (Platt slope 0)"
    if isinstance(cal, Isotonic) and (not cal.y or max(cal.y) - min(cal.y) < _FLAT):
        return "calibration is constant (flat isotonic fit)"
    if isinstance(cal, Temperature) and math.isinf(cal.temperature):
        return "calibration is constant (infinite temperature)"
    return None


def skill_reason(card: FindingCard | None) -> str | None:
    """Why the model card shows no skill for a finding (None when it does, or when there is no card)."""
    if card is None:
        return None
    if card.auroc is None:
        return "no AUROC on the model card (one class in the evaluation data)"
    if card.auroc > NO_SKILL_AUROC:
        return None
    if card.auroc_ci is None:
        return f"no skill shown: AUROC {card.auroc:.2f}, too few positives for a CI"
    low, high = card.auroc_ci
    if low <= 0.5 <= high:
        return f"no skill shown: AUROC {card.auroc:.2f} [{low:.2f}, {high:.2f}] includes 0.5"
    return None


def unreported(calibration: Calibration, card: ModelCard | None) -> dict[str, str]:
    """{finding: reason} for every finding the run must not flag (constant calibration or no skill shown)."""
    out = {}
    for name, cal in zip(calibration.findings, calibration.calibrators, strict=True):
        reason = constant_reason(cal) or skill_reason(card.findings.get(name) if card else None)
        if reason:
            out[name] = reason
    return out


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def _ci(value: Any) -> tuple[float, float] | None:
    if not value or len(value) != 2 or value[0] is None or value[1] is None:
        return None
    return float(value[0]), float(value[1])
