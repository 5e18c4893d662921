"""The Predictor: a run folder + a backend -> per-finding raw and calibrated probabilities, thresholds, flags.

This is the one prediction path shared by the app, `medvit predict`, the batch predictor and the
benchmark. Which run: the argument, else `$MEDVIT_RUN`, else the demo model in `medvit/resources/demo/`.
Which backend: the argument, else `$MEDVIT_BACKEND`, else `auto` (the fastest backend that matches
eager fp32 on this machine; see `medvit.inference.choice`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from medvit._platform import machine_fingerprint
from medvit.data.dicom import XrayImage, check_chest_frontal
from medvit.data.transforms import build_transforms
from medvit.errors import CheckpointError, ConfigError
from medvit.evaluate.calibration import Calibration
from medvit.evaluate.metrics import flagged
from medvit.evaluate.ood import has_features, load_ood, needs_check, ood_warnings
from medvit.evaluate.reporting import read_card, unreported
from medvit.evaluate.versions import UNCALIBRATED, active_name, load_active
from medvit.inference import AUTO
from medvit.inference.choice import SelfCheck, auto_candidates, load_choice, save_choice, self_check
from medvit.inference.engines import AUTO_TOLERANCE, Backend, create_backend, sigmoid
from medvit.inference.export import verified_engine
from medvit.inference.features import FeatureSource, forward
from medvit.inference.fp32check import reference_inputs, verify
from medvit.rundir import resolve_run_dir
from medvit.runs import CALIBRATION, RunInfo, load_run

_log = logging.getLogger(__name__)

BACKEND_ENV = "MEDVIT_BACKEND"
TABLE_COLUMNS = ("finding", "prob_raw", "prob", "threshold", "flag", "margin", "reported", "reason")


def load_model(run_dir: str | os.PathLike | None = None) -> tuple[nn.Module, RunInfo]:
    """`load_run` on the resolved run folder (see `resolve_run_dir`)."""
    return load_run(resolve_run_dir(run_dir))


def load_calibration(info: RunInfo) -> tuple[Calibration, str]:
    """The run's active calibration version and its name (see `medvit.evaluate.versions`), or an explicit
    identity (sigmoid, threshold 0.5) named "none" for a never-calibrated run."""
    version, cal = load_active(info.run_dir, info.findings)
    if version == UNCALIBRATED:
        _log.warning("%s has no %s: probabilities are uncalibrated, thresholds 0.5 (run `medvit calibrate`)",
                     info.run_dir, CALIBRATION)
    return cal, version


@dataclass(frozen=True)
class Prediction:
    """One image's result. `timings_ms` splits the latency into preprocess / forward / calibrate (/ ood).

    `warnings`: what a reader must see beside the table; today the out-of-distribution check's message for an
    image without body-part tags whose features are far from the training chests (`medvit.evaluate.ood`).
    """

    table: pd.DataFrame
    model_name: str
    weights_sha256: str
    backend: str
    calibrated: bool
    calibration_version: str = UNCALIBRATED  # the run's active calibration version ("v1", "v2", ...)
    timings_ms: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


def make_table(findings: Sequence[str], logits: np.ndarray, probs: np.ndarray, thresholds: np.ndarray,
               not_reported: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The table a clinician sees, one row per finding. A finding in `not_reported` (finding -> reason, see
    `medvit.evaluate.reporting`) keeps its numbers but is never flagged."""
    probs = np.asarray(probs, dtype=np.float64)
    not_reported = not_reported or {}
    reported = np.array([f not in not_reported for f in findings], dtype=bool)
    return pd.DataFrame({
        "finding": list(findings),
        "prob_raw": sigmoid(logits),
        "prob": probs,
        "threshold": np.asarray(thresholds, dtype=np.float64),
        "flag": flagged(probs, thresholds) & reported,
        "margin": probs - thresholds,
        "reported": reported,
        "reason": [not_reported.get(f, "") for f in findings],
    })


def _auto_backend(model: nn.Module, info: RunInfo) -> tuple[Backend, SelfCheck | None]:
    """The backend of the cached self-check for these weights on this machine, or of a fresh self-check."""
    key = f"{info.weights_sha256}:{machine_fingerprint()}"
    cached = load_choice(key)
    input_size = info.preprocessing["input_size"]
    if cached and cached.get("backend") in auto_candidates():
        _log.info("backend %s (self-check of %s cached)", cached["backend"], cached.get("date", "?"))
        return create_backend(cached["backend"], model, input_size=input_size,
                              graph_provider=_graph_provider(model, info)), None
    sample = reference_inputs(info.config, info.preprocessing)
    _log.info("choosing the fastest backend that matches fp32 (one-time self-check on %d real image(s))", len(sample))
    check, engine = self_check(model, sample, graph_provider=_graph_provider(model, info, sample))
    save_choice(key, check)
    return engine, check


def _check_against_fp32(model: nn.Module, info: RunInfo, engine: Backend) -> None:
    """An explicitly chosen backend is checked too (the chest CR and one of the run's images): fast must never mean
    silently wrong."""
    check = verify(engine, model, reference_inputs(info.config, info.preprocessing, n=1), AUTO_TOLERANCE)
    if not check.ok:
        raise CheckpointError(
            f"backend {engine.name} differs from fp32 torch by max |dp| {check.max_abs_dp:.3g} (> {AUTO_TOLERANCE}) "
            "on a real image with this model; use --backend torch or auto"
        )


def _graph_provider(model: nn.Module, info: RunInfo, inputs: np.ndarray | None = None) -> Callable[[str], Backend]:
    """Builds the engine over a verified (found or exported) graph file; `inputs`: images already decoded."""
    return lambda kind: verified_engine(model, info, kind, inputs)


class Predictor:
    """Preprocess -> backend forward -> calibration -> table, for one run folder."""

    def __init__(self, model: nn.Module, info: RunInfo, calibration: Calibration, backend: Backend,
                 check: SelfCheck | None = None, calibration_version: str = UNCALIBRATED) -> None:
        self.model, self.info, self.calibration, self.backend = model, info, calibration, backend
        self.calibration_version = calibration_version
        self._calibration_lock = threading.Lock()
        self.self_check = check
        self.transform = build_transforms(info.preprocessing, train=False)
        self.calibrated = calibration.method != "none"
        self.card = read_card(info.run_dir)
        self.not_reported = unreported(calibration, self.card)  # finding -> why it is never flagged
        self.ood = load_ood(info) if has_features(model) else None  # None: no out-of-distribution check
        self.features = None if self.ood is None else FeatureSource(model, info, backend, self.ood)

    @classmethod
    def from_dir(cls, run_dir: str | os.PathLike | None = None, backend: str = AUTO) -> Predictor:
        """Load a run and build its backend.

        Args:
            run_dir: run folder (None: $MEDVIT_RUN, else the demo model).
            backend: one of medvit.inference.BACKENDS, or "auto" ($MEDVIT_BACKEND overrides "auto").
        """
        model, info = load_model(run_dir)
        calibration, version = load_calibration(info)
        if backend == AUTO:
            backend = os.environ.get(BACKEND_ENV) or AUTO
        check = None
        if backend == AUTO:
            engine, check = _auto_backend(model, info)
        else:
            engine = create_backend(backend, model, input_size=info.preprocessing["input_size"],
                                    graph_provider=_graph_provider(model, info))
            if engine.name != "torch":
                _check_against_fp32(model, info, engine)
        _log.info("predictor: %s on %s backend, calibration %s", info.model_name, engine.name, version)
        return cls(model, info, calibration, engine, check, version)

    @property
    def findings(self) -> tuple[str, ...]:
        return self.info.findings

    def preprocess(self, image: XrayImage) -> torch.Tensor:
        """Refuse unsuitable images (lateral, non-chest), then the model's eval transform (3xHxW)."""
        check_chest_frontal(image.meta)
        return self.transform(image.pixels)

    def predict_inputs(self, x: np.ndarray | torch.Tensor, ood_mask: Sequence[bool] | None = None
                       ) -> list[Prediction]:
        """Predictions for a preprocessed batch (N, C, H, W); timings are per batch.

        `ood_mask`: which images get the out-of-distribution check (default all: preprocessed inputs carry no tags).
        Checked images are scored by the engine whose features the check reads (`medvit.inference.features`), which
        each Prediction's `backend` names.
        """
        cal, version, not_reported = self.follow_active_calibration()
        t0 = time.perf_counter()
        x = np.asarray(x, dtype=np.float32)
        mask = np.ones(len(x), dtype=bool) if ood_mask is None else np.asarray(ood_mask, dtype=bool)
        checker = self.features.engine() if self.features is not None and mask.any() else None
        logits, features, engines = forward(self.backend, checker, x, mask)
        t1 = time.perf_counter()
        probs = cal.apply(logits)
        out = [make_table(self.findings, logits[i], probs[i], cal.thresholds, not_reported) for i in range(len(logits))]
        t2 = time.perf_counter()
        timings = {"forward": (t1 - t0) * 1e3, "calibrate": (t2 - t1) * 1e3}
        warnings = ood_warnings(self.ood, self.model, x, mask.tolist(), features)
        if self.ood is not None:
            timings["ood"] = (time.perf_counter() - t2) * 1e3
        return [Prediction(t, self.info.model_name, self.info.weights_sha256, e, cal.method != "none",
                           version, dict(timings), warnings=w)
                for t, e, w in zip(out, engines, warnings, strict=True)]

    def follow_active_calibration(self) -> tuple[Calibration, str, dict[str, str]]:
        """The active calibration version, its name and the findings it leaves unreported, reloaded when
        `medvit calibrate --activate` or a new site version changed it since this predictor loaded: a long-running
        app or PACS watcher follows it without a restart (one small file read per call)."""
        with self._calibration_lock:
            if active_name(self.info.run_dir) != self.calibration_version:
                version, cal = load_active(self.info.run_dir, self.findings)
                _log.info("calibration %s is now active (was %s)", version, self.calibration_version)
                self.calibration, self.calibration_version, self.calibrated = cal, version, cal.method != "none"
                self.not_reported = unreported(cal, self.card)
            return self.calibration, self.calibration_version, self.not_reported

    @property
    def input_side(self) -> int:
        """The model's input side: what `read_image(min_side=...)` must still deliver (JPEG 2000 reduction)."""
        return int(max(self.info.preprocessing["input_size"][1:]))

    def predict(self, image: XrayImage) -> Prediction:
        """The table for one image.

        Raises:
            UnsupportedImageError: lateral view or not a chest radiograph.
        """
        t0 = time.perf_counter()
        x = self.preprocess(image).unsqueeze(0)
        pre_ms = (time.perf_counter() - t0) * 1e3
        pred = self.predict_inputs(x, [needs_check(image.meta)])[0]
        pred.timings_ms["preprocess"] = pre_ms
        return pred

    def predict_many(self, images: Sequence[XrayImage], batch_size: int = 8) -> list[Prediction]:
        """Tables for several images, batched through the backend (any unsuitable image raises)."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        inputs = [self.preprocess(im) for im in images]
        out: list[Prediction] = []
        for i in range(0, len(inputs), batch_size):
            out.extend(self.predict_inputs(torch.stack(inputs[i : i + batch_size]),
                                           [needs_check(im.meta) for im in images[i : i + batch_size]]))
        return out
