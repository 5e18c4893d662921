"""The per-finding calibrators — temperature, Platt and isotonic — their JSON form, and how each is fitted.

Each is a monotone map from one finding's logit to a calibrated probability, stored as plain numbers (no pickles):
temperature p = sigmoid(z / T); Platt p = sigmoid(a z + b) (scikit-learn LogisticRegression on the logit);
isotonic = scikit-learn IsotonicRegression kept as its breakpoints and applied with np.interp.
Applying them needs NumPy and `scipy.special` only: the fits import scikit-learn and SciPy's optimisers when they
run, so that the review app's start-up (which applies calibrators, never fits them) does not wait for those imports.
Choosing among them (cross-validation), thresholds and the calibration.json file are `medvit.calibrate`'s job.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from scipy.special import expit, logit, logsumexp

from medvit.errors import CheckpointError

ISOTONIC_EPS = 1e-3  # isotonic never outputs exactly 0 or 1: one unseen case must not cost infinite log-loss
PARAM_KEYS = frozenset({"calibrator", "temperature", "a", "b", "x", "y"})  # the JSON keys `calibrator_from_json` reads
_LOG_T_BOUNDS = (math.log(0.02), math.log(50.0))


class Calibrator(Protocol):
    """Maps one finding's logits to calibrated probabilities; `params` is its JSON form."""

    @property
    def kind(self) -> str: ...

    def apply(self, z: np.ndarray) -> np.ndarray: ...

    def params(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Temperature:
    temperature: float
    kind: str = field(default="temperature", init=False)

    def apply(self, z: np.ndarray) -> np.ndarray:
        return expit(np.asarray(z, dtype=np.float64) / self.temperature)

    def params(self) -> dict[str, Any]:
        return {"temperature": self.temperature}


@dataclass(frozen=True)
class Platt:
    a: float
    b: float
    kind: str = field(default="platt", init=False)

    def apply(self, z: np.ndarray) -> np.ndarray:
        return expit(self.a * np.asarray(z, dtype=np.float64) + self.b)

    def params(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b}


@dataclass(frozen=True)
class Isotonic:
    x: tuple[float, ...]  # IsotonicRegression.X_thresholds_ (logits, ascending)
    y: tuple[float, ...]  # IsotonicRegression.y_thresholds_ (probabilities)
    kind: str = field(default="isotonic", init=False)

    def apply(self, z: np.ndarray) -> np.ndarray:
        # np.interp clamps outside [x0, xn], like IsotonicRegression(out_of_bounds="clip")
        return np.interp(np.asarray(z, dtype=np.float64), self.x, self.y)

    def params(self) -> dict[str, Any]:
        return {"x": list(self.x), "y": list(self.y)}


def calibrator_from_json(d: dict[str, Any]) -> Calibrator:
    """The calibrator of one finding's calibration.json entry ({"calibrator": kind, **params})."""
    kind = d.get("calibrator")
    if kind == "temperature":
        return Temperature(float(d["temperature"]))
    if kind == "platt":
        return Platt(float(d["a"]), float(d["b"]))
    if kind == "isotonic":
        return Isotonic(tuple(map(float, d["x"])), tuple(map(float, d["y"])))
    raise CheckpointError(f"calibration.json: unknown calibrator {kind!r}; expected temperature, platt or isotonic")


def _bce_sum(z: np.ndarray, y: np.ndarray) -> float:
    """Sum of binary cross-entropy of logits z against 0/1 labels y (numerically stable)."""
    return float(np.sum(np.logaddexp(0.0, z) - y * z))


def _fit_log_t(objective: Callable[[float], float]) -> float:
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(objective, bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-5})
    return float(res.x)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the NLL of the scaled logits; reusable for any scores.

    * `logits` and `labels` of the same shape (1-D, or (N, K) multi-label with NaN = unknown): sigmoid(z / T),
      one T shared by all entries;
    * `logits` (N, C) with integer class `labels` (N,): softmax(z / T). For a zero-shot prompt pair pass
      [s_pos, s_neg] columns with label 0 for positive images, or equivalently 1-D `s_pos - s_neg` with label 1.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if z.ndim == 2 and y.ndim == 1 and z.shape[0] == y.shape[0]:
        cls = y.astype(int)
        picked = z[np.arange(len(cls)), cls]
        return math.exp(
            _fit_log_t(lambda lt: float(np.sum(logsumexp(z / math.exp(lt), axis=1) - picked / math.exp(lt))))
        )
    if z.shape != y.shape:
        raise ValueError(f"logits {z.shape} and labels {y.shape} must have the same shape (or (N, C) and (N,))")
    m = ~np.isnan(y)
    if not m.any():
        raise ValueError("fit_temperature needs at least one labelled entry")
    z, y = z[m], y[m]
    return math.exp(_fit_log_t(lambda lt: _bce_sum(z / math.exp(lt), y)))


def _fit_temperatures(z: np.ndarray, y: np.ndarray, strength: float) -> tuple[float, list[float]]:
    """Shared temperature and per-finding temperatures shrunk towards it with a Gaussian prior on log T.

    Per finding: minimise sum BCE(z / T) + strength * (log T - log T_shared)^2. strength 0 = independent
    per-finding fits; inf = the shared temperature for all. Rare findings (few labelled cases) shrink the most.
    """
    shared = fit_temperature(z, y)
    if math.isinf(strength):
        return shared, [shared] * z.shape[1]
    log_shared = math.log(shared)
    temps = []
    for k in range(z.shape[1]):
        m = ~np.isnan(y[:, k])

        def objective(lt: float, zk: np.ndarray = z[m, k], yk: np.ndarray = y[m, k]) -> float:
            return _bce_sum(zk / math.exp(lt), yk) + strength * (lt - log_shared) ** 2

        temps.append(math.exp(_fit_log_t(objective)))
    return shared, temps


def fit_platt(z: np.ndarray, y: np.ndarray) -> Platt:
    """Platt scaling via LogisticRegression on the logit; falls back to the (smoothed) prevalence when the fit
    is impossible (one class) or would reverse the model's ranking (negative slope)."""
    n_pos = int(np.sum(y == 1))
    if 0 < n_pos < len(y):
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(C=1.0, solver="newton-cg").fit(z.reshape(-1, 1), y.astype(int))
        a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
        if a > 0:
            return Platt(a, b)
    return Platt(0.0, _prevalence_logit(y))


def _prevalence_logit(y: np.ndarray) -> float:
    return float(logit((np.sum(y == 1) + 0.5) / (len(y) + 1.0)))


def fit_platt_shared_slope(z: np.ndarray, y: np.ndarray) -> list[Platt]:
    """Platt scaling with one slope for all findings and one intercept per finding (NaN labels left out).

    LogisticRegression on long-format rows [logit, one-hot finding]: rare findings borrow the slope from
    common ones and only estimate their prevalence. A finding with one class gets its smoothed prevalence.
    """
    from scipy.optimize import brentq
    from sklearn.linear_model import LogisticRegression

    k = z.shape[1]
    rows, cols = np.nonzero(~np.isnan(y))
    x = np.zeros((len(rows), 1 + k))
    x[:, 0] = z[rows, cols]
    x[np.arange(len(rows)), 1 + cols] = 1.0
    target = y[rows, cols].astype(int)
    slope, intercepts = 0.0, np.zeros(k)
    if 0 < target.sum() < len(target):
        lr = LogisticRegression(C=100.0, fit_intercept=False, solver="newton-cg").fit(x, target)
        slope, intercepts = max(float(lr.coef_[0, 0]), 0.0), lr.coef_[0, 1:]
    out = []
    for j in range(k):
        known = ~np.isnan(y[:, j])
        yj, zj = y[known, j], z[known, j]
        if slope > 0 and yj.size and yj.min() < yj.max():
            out.append(Platt(slope, float(intercepts[j])))
        elif yj.size:  # one class: the intercept whose mean probability is the smoothed prevalence
            target_p = expit(_prevalence_logit(yj))
            b = brentq(lambda b, zj=zj, t=target_p: float(np.mean(expit(slope * zj + b))) - t, -60.0, 60.0)
            out.append(Platt(slope, float(b)))
        else:
            out.append(Platt(0.0, 0.0))
    return out


def fit_isotonic(z: np.ndarray, y: np.ndarray) -> Isotonic:
    """Isotonic regression of the label on the logit, kept as its breakpoints."""
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=ISOTONIC_EPS, y_max=1 - ISOTONIC_EPS, increasing=True, out_of_bounds="clip")
    iso.fit(z, y)
    return Isotonic(tuple(map(float, iso.X_thresholds_)), tuple(map(float, iso.y_thresholds_)))


def fit_family(family: str, z: np.ndarray, y: np.ndarray, strength: float = 0.0) -> list[Calibrator]:
    """One calibrator per finding column of z/y (NaN labels are left out); `strength` inf shares the
    temperature or the Platt slope across findings, 0 fits each finding alone."""
    if family == "temperature":
        _, temps = _fit_temperatures(z, y, strength)
        return [Temperature(t) for t in temps]
    if family == "platt" and math.isinf(strength):
        return list(fit_platt_shared_slope(z, y))
    fit = fit_platt if family == "platt" else fit_isotonic
    out: list[Calibrator] = []
    for k in range(z.shape[1]):
        m = ~np.isnan(y[:, k])
        out.append(fit(z[m, k], y[m, k]))
    return out
