"""Per-finding probability calibration and operating thresholds, stored as plain JSON (no pickles).

A multi-label model trained with class weighting gives scores that rank well but are not probabilities. Each
finding gets a monotone map from its logit to a calibrated probability (the maps and their fits live in
`medvit.calibrators`; this module chooses among them and owns thresholds and calibration.json):

* temperature: p = sigmoid(z / T). With small calib sets per-finding temperatures overfit, so the fit also
  considers one *shared* temperature and per-finding temperatures *shrunk* towards it, and picks among them by
  patient-grouped cross-validation;
* Platt: p = sigmoid(a z + b) (scikit-learn LogisticRegression on the logit), which can also correct the
  prevalence shift that class weighting causes;
* isotonic: scikit-learn IsotonicRegression, serialised as its breakpoints and applied with np.interp.

`method="auto"` picks among the three by the same cross-validated NLL. The operating threshold of each finding
is chosen on the calibrated probabilities (target sensitivity, Youden J or max F1); a finding is flagged when
`prob >= threshold`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit

from medvit._io import atomic_write_bytes
from medvit.errors import CheckpointError, DatasetError
from medvit.evaluate import metrics
from medvit.evaluate.calibrators import (
    ISOTONIC_EPS,
    PARAM_KEYS,
    Calibrator,
    Isotonic,
    Platt,
    Temperature,
    calibrator_from_json,
    fit_family,
    fit_isotonic,
    fit_platt,
    fit_platt_shared_slope,
    fit_temperature,
)

# the calibrators moved to medvit.calibrators; these names stay importable from here
__all__ = [
    "ISOTONIC_EPS", "METHODS", "THRESHOLD_RULES", "Calibration", "Calibrator", "Isotonic", "Platt", "Temperature",
    "choose_threshold", "cross_validated_nll", "cross_validated_probs", "fit_calibration", "fit_isotonic",
    "fit_platt", "fit_platt_shared_slope", "fit_temperature",
]

_log = logging.getLogger(__name__)

METHODS = ("temperature", "isotonic", "platt", "auto")
THRESHOLD_RULES = ("sensitivity", "youden", "f1")
SHRINKAGE_GRID = (0.0, 1.0, 4.0, 16.0, 64.0, math.inf)  # prior strength in pseudo-images; inf = shared temperature
FORMAT_VERSION = 1


def _heldout_nll(cals: Sequence[Calibrator], z: np.ndarray, y: np.ndarray) -> float:
    """Summed NLL over the labelled entries of held-out rows."""
    total = 0.0
    for k, cal in enumerate(cals):
        m = ~np.isnan(y[:, k])
        if m.any():
            total += metrics.nll(cal.apply(z[m, k]), y[m, k]) * int(m.sum())
    return total


def _candidates(method: str) -> list[tuple[str, float]]:
    temps = [("temperature", s) for s in SHRINKAGE_GRID]
    platts = [("platt", 0.0), ("platt", math.inf)]
    if method == "temperature":
        return temps
    if method == "platt":
        return platts
    if method == "auto":
        return [*temps, *platts, ("isotonic", 0.0)]
    return [(method, 0.0)]


def _candidate_name(family: str, strength: float) -> str:
    if family == "platt":
        return "platt/shared_slope" if math.isinf(strength) else "platt"
    if family != "temperature":
        return family
    if math.isinf(strength):
        return "temperature/shared"
    return "temperature/per_finding" if strength == 0 else f"temperature/shrink_{strength:g}"


def _parse_candidate(name: str) -> tuple[str, float]:
    family, _, variant = name.partition("/")
    if variant == "per_finding":
        return family, 0.0
    if variant.startswith("shrink_"):
        return family, float(variant.removeprefix("shrink_"))
    return family, (math.inf if variant in ("shared", "shared_slope") else 0.0)


def _group_folds(groups: np.ndarray, n_folds: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import GroupKFold  # fit-time only, like every scikit-learn use here

    return GroupKFold(n_splits=min(n_folds, len(np.unique(groups)))).split(groups, groups=groups)


def cross_validated_nll(
    z: np.ndarray, y: np.ndarray, groups: np.ndarray, method: str, n_folds: int = 5
) -> dict[str, float]:
    """Mean held-out NLL per labelled entry of each candidate calibrator, with folds that keep patients together."""
    folds = _group_folds(groups, n_folds)
    totals: dict[str, float] = {_candidate_name(f, s): 0.0 for f, s in _candidates(method)}
    for train, test in folds:
        for family, strength in _candidates(method):
            cals = fit_family(family, z[train], y[train], strength)
            totals[_candidate_name(family, strength)] += _heldout_nll(cals, z[test], y[test])
    n = int(np.sum(~np.isnan(y)))
    return {name: total / n for name, total in totals.items()}


# ------------------------------------------------------------------------------------------------- thresholds


def choose_threshold(
    probs: np.ndarray, labels: np.ndarray, rule: str = "sensitivity", target_sensitivity: float = 0.9
) -> tuple[float, str | None]:
    """Operating threshold on the calibrated probabilities (flag when prob >= threshold) and a note if it is
    a fallback. `sensitivity`: the highest threshold whose sensitivity on these data is >= the target."""
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    n_pos = int(np.sum(y == 1))
    if n_pos == 0 or n_pos == len(y):
        return 0.5, f"{'no positive' if n_pos == 0 else 'no negative'} labels in the calibration data; threshold 0.5"
    if rule == "sensitivity":
        pos = np.sort(p[y == 1])[::-1]
        return float(pos[math.ceil(target_sensitivity * n_pos) - 1]), None
    if rule == "youden":
        from sklearn.metrics import roc_curve

        fpr, tpr, thr = roc_curve(y, p)
        best = int(np.argmax(tpr[1:] - fpr[1:])) + 1  # thr[0] is +inf (nothing flagged)
        return float(thr[best]), None
    if rule == "f1":
        from sklearn.metrics import precision_recall_curve

        prec, rec, thr = precision_recall_curve(y, p)
        f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)
        return float(thr[int(np.argmax(f1))]), None
    raise ValueError(f"unknown threshold rule {rule!r}; expected one of {THRESHOLD_RULES}")


# ------------------------------------------------------------------------------------------------ calibration


@dataclass(frozen=True)
class Calibration:
    """Per-finding calibrators and thresholds; `apply` maps model logits (N, K) to calibrated probabilities."""

    findings: tuple[str, ...]
    calibrators: tuple[Calibrator, ...]
    thresholds: np.ndarray
    method: str
    info: dict[str, Any] = field(default_factory=dict)  # selection scores, fitted-on data, per-finding notes

    def __post_init__(self) -> None:
        # accept lists from callers; findings are compared as tuples and thresholds broadcast as an array
        object.__setattr__(self, "findings", tuple(self.findings))
        object.__setattr__(self, "calibrators", tuple(self.calibrators))
        object.__setattr__(self, "thresholds", np.asarray(self.thresholds, dtype=np.float64))
        if not len(self.findings) == len(self.calibrators) == len(self.thresholds):
            raise ValueError("Calibration needs one calibrator and one threshold per finding")

    def apply(self, logits: np.ndarray) -> np.ndarray:
        z = np.asarray(logits, dtype=np.float64)
        if z.ndim != 2 or z.shape[1] != len(self.findings):
            raise ValueError(f"logits must be (N, {len(self.findings)}), got {z.shape}")
        return np.stack([cal.apply(z[:, k]) for k, cal in enumerate(self.calibrators)], axis=1)

    def flags(self, probs: np.ndarray) -> np.ndarray:
        return metrics.flagged(probs, self.thresholds)

    def check_findings(self, findings: Sequence[str]) -> None:
        """Refuse a calibration fitted for another finding list (order matters: columns map to findings)."""
        if tuple(findings) != self.findings:
            raise CheckpointError(
                f"calibration.json is for findings {list(self.findings)} but the model predicts {list(findings)}; "
                "re-run `medvit calibrate --run RUN_DIR`"
            )

    @classmethod
    def identity(cls, findings: Sequence[str], threshold: float = 0.5) -> Calibration:
        """Uncalibrated sigmoid with a fixed threshold, for runs that were never calibrated."""
        k = len(findings)
        return cls(tuple(findings), tuple(Temperature(1.0) for _ in range(k)), np.full(k, threshold), "none")

    def to_json(self) -> str:
        per = self.info.get("findings", {})
        findings = {
            name: {"calibrator": cal.kind, **cal.params(), "threshold": float(t), **per.get(name, {})}
            for name, cal, t in zip(self.findings, self.calibrators, self.thresholds, strict=True)
        }
        rest = {key: v for key, v in self.info.items() if key != "findings"}
        return json.dumps({"version": FORMAT_VERSION, "method": self.method, **rest, "findings": findings}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        try:
            d = json.loads(text)
            names = tuple(d["findings"])
            cals = tuple(calibrator_from_json(d["findings"][n]) for n in names)
            thresholds = np.array([float(d["findings"][n]["threshold"]) for n in names])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"calibration.json is malformed ({e!r}); re-run `medvit calibrate`") from e
        per = {n: {k: v for k, v in d["findings"][n].items() if k not in PARAM_KEYS | {"threshold"}} for n in names}
        info = {k: v for k, v in d.items() if k not in ("version", "method", "findings")} | {"findings": per}
        return cls(names, cals, thresholds, str(d.get("method", "unknown")), info)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file + fsync + rename): a crash never leaves a half-written calibration."""
        atomic_write_bytes(path, self.to_json().encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        try:
            text = Path(path).read_text()
        except FileNotFoundError as e:
            raise CheckpointError(f"{path} not found; run `medvit calibrate --run RUN_DIR` first") from e
        return cls.from_json(text)


def fit_calibration(
    logits: np.ndarray,
    labels: np.ndarray,
    findings: Sequence[str],
    groups: np.ndarray,
    *,
    method: str = "temperature",
    threshold_rule: str = "sensitivity",
    target_sensitivity: float = 0.9,
    n_folds: int = 5,
) -> Calibration:
    """Fit per-finding calibrators and thresholds on a calibration set.

    Args:
        logits: (N, K) raw model outputs. labels: (N, K) 0/1 with NaN = unknown. groups: (N,) patient ids, so
            cross-validation never splits one patient's images across folds.
        method: temperature (shared / shrunk / per-finding, picked by CV), isotonic, platt, or auto (CV over all).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if threshold_rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {threshold_rule!r}; expected one of {THRESHOLD_RULES}")
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    groups = np.asarray(groups)
    if z.shape != y.shape or z.shape[1] != len(findings) or len(groups) != len(z):
        raise ValueError(
            f"shapes differ: logits {z.shape}, labels {y.shape}, {len(findings)} findings, groups {len(groups)}"
        )
    if np.isnan(y).all():
        raise DatasetError("the calibration set has no labels for any finding; check the labels CSV and --split")

    n_patients = len(np.unique(groups))
    candidates = _candidates(method)
    cv: dict[str, float] = {}
    if len(candidates) > 1 and n_patients >= 2:
        cv = cross_validated_nll(z, y, groups, method, n_folds)
        family, strength = min(candidates, key=lambda c: cv[_candidate_name(*c)])
    else:  # nothing to cross-validate with: the least flexible candidate
        family, strength = ("temperature", math.inf) if method in ("temperature", "auto") else candidates[-1]
    chosen = _candidate_name(family, strength)
    _log.info("calibration: chose %s (CV NLL per label: %s)", chosen, {k: round(v, 4) for k, v in cv.items()})

    cals = fit_family(family, z, y, strength)
    probs = np.stack([c.apply(z[:, k]) for k, c in enumerate(cals)], axis=1)
    thresholds, per = [], {}
    for k, name in enumerate(findings):
        m = ~np.isnan(y[:, k])
        t, note = choose_threshold(probs[m, k], y[m, k], threshold_rule, target_sensitivity)
        thresholds.append(t)
        per[name] = {"n_labelled": int(m.sum()), "n_pos": int(np.sum(y[m, k] == 1))} | ({"note": note} if note else {})
    info: dict[str, Any] = {
        "chosen": chosen,
        "threshold_rule": threshold_rule,
        "target_sensitivity": target_sensitivity if threshold_rule == "sensitivity" else None,
        "selection": {"cv_nll_per_label": cv, "folds": min(n_folds, n_patients), "grouped_by": "patient"},
        "fitted_on": {"n_images": int(len(z)), "n_patients": n_patients},
        "findings": per,
    }
    if family == "temperature":
        info["shared_temperature"] = fit_temperature(z, y)
        info["shrinkage_strength"] = None if math.isinf(strength) else strength
    return Calibration(tuple(findings), tuple(cals), np.asarray(thresholds), family, info)


def cross_validated_probs(
    logits: np.ndarray, labels: np.ndarray, groups: np.ndarray, calibration: Calibration, n_folds: int = 5
) -> np.ndarray:
    """Out-of-fold calibrated probabilities on the calibration set itself.

    Each patient's probabilities come from the chosen calibrator refitted without that patient's fold, so the
    ECE computed from them estimates calibration on unseen patients rather than the (optimistic) in-sample fit.
    """
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if calibration.method == "none":
        return expit(z)
    family, strength = _parse_candidate(str(calibration.info.get("chosen", calibration.method)))
    out = np.empty_like(z)
    for train, test in _group_folds(np.asarray(groups), n_folds):
        cals = fit_family(family, z[train], y[train], strength)
        out[test] = np.stack([c.apply(z[test, k]) for k, c in enumerate(cals)], axis=1)
    return out
