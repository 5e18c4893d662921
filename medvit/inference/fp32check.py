"""The one check that an engine or exported graph reproduces eager fp32 torch, on real images.

Export (before a graph is kept), `auto` (before an engine is chosen) and the Predictor (for an engine named
explicitly) all go through `verify`: fast must never mean silently wrong. The inputs are real radiographs,
pydicom-data's RG1_UNCI chest CR and the run's own data, preprocessed exactly as the Predictor does.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.data import get_testdata_file
from torch import nn

from medvit.data.datasets import load_labels
from medvit.data.dicom import read_image
from medvit.data.transforms import build_transforms
from medvit.errors import CheckpointError, MedvitError
from medvit.evaluate.ood import OodStats
from medvit.findings import DEFAULT_FINDINGS
from medvit.inference.engines import Backend, TorchBackend, max_prob_diff

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verification:
    """How a candidate engine compares with eager fp32 torch on real inputs."""

    max_abs_diff: float  # logits
    max_abs_dp: float  # sigmoid probabilities
    n_images: int
    tolerance: float  # on max_abs_dp

    @property
    def ok(self) -> bool:
        return self.max_abs_dp <= self.tolerance and bool(np.isfinite(self.max_abs_diff))


def fp32_reference(model: nn.Module, inputs: np.ndarray) -> np.ndarray:
    """Eager fp32 logits of `inputs` at batch N followed by those of `inputs[:1]` at batch 1: what `verify` compares
    against (each batch size with its own, since eager fp32 itself rounds a little differently per batch size)."""
    ref = TorchBackend(model)
    return np.concatenate([ref(inputs), ref(inputs[:1])])


def verify(candidate: Backend, model: nn.Module, inputs: np.ndarray, tolerance: float, *,
           reference: np.ndarray | None = None) -> Verification:
    """Run `candidate` on `inputs` (N, C, H, W) at batch N and at batch 1 and compare with eager fp32 `model`.

    Both batch sizes are checked because a graph can be right at one and wrong at the other (a batch axis
    that was traced as a constant, a kernel chosen per shape).

    Args:
        reference: `fp32_reference(model, inputs)`, when the caller checks several candidates against it.
    """
    ref2 = fp32_reference(model, inputs) if reference is None else reference
    out = np.concatenate([candidate(inputs), candidate(inputs[:1])])
    if out.shape != ref2.shape:
        return Verification(float("inf"), float("inf"), len(inputs), tolerance)
    return Verification(float(np.max(np.abs(out - ref2))), max_prob_diff(out, ref2), len(inputs), tolerance)


def feature_drift(candidate: Backend, model: nn.Module, inputs: np.ndarray, stats: OodStats, *,
                  reference: np.ndarray | None = None) -> float | None:
    """How far `candidate`'s out-of-distribution distances on `inputs` stray from eager fp32's, as a share of the
    threshold (max |d - d_fp32| / threshold): a flag can only flip for an image that close to it. None when the
    candidate's graph has no features output. `reference`: eager fp32 features of `inputs`, when already computed."""
    features = candidate.run(inputs)[1]
    if features is None:
        return None
    if reference is None:
        reference = TorchBackend(model).run(inputs)[1]
    if reference is None:
        return None
    return float(np.max(np.abs(stats.distance(features) - stats.distance(reference))) / stats.threshold)


def _run_images(config: dict[str, Any], n: int) -> list[str]:
    """Up to `n` image paths from the run's own data (val split first), or [] when it is not on this machine."""
    try:
        data = config["data"]
        findings = data.get("findings") or DEFAULT_FINDINGS
        df = load_labels(data["labels_csv"], data["images_root"], findings, check_files=False)
    except (OSError, KeyError, TypeError, ValueError, MedvitError) as e:
        _log.warning("the run's own images are not on this machine (%s): checking against fp32 on pydicom-data's "
                     "RG1_UNCI.dcm alone; set $MEDVIT_DATA_ROOT to the folder holding the run's data to use them", e)
        return []
    if df["split"].notna().any():
        df = df.assign(_order=df["split"] != "val").sort_values("_order", kind="stable")
    return list(itertools.islice((p for p in df["path"] if os.path.isfile(p)), n))


def reference_images(config: dict[str, Any] | None, n: int = 4) -> list[str]:
    """Real images to verify (and calibrate NNCF) on: pydicom-data's RG1_UNCI chest CR, then up to `n` of the run's
    own images (`config.json` "data").

    The CR comes first, so every check sees what a PACS sends: a windowed 15-bit MONOCHROME1 DICOM, whose
    intensities the run's PNGs need not cover. An int8 graph checked on 4 PNGs alone passed (0.013) and then
    drifted 0.025 on RG1_UNCI (NNCF int8, tiny model, AMX CPU).
    """
    dicom = get_testdata_file("RG1_UNCI.dcm")
    paths = [str(dicom)] if dicom is not None else []
    own = _run_images(config, n) if config else []
    if own:
        _log.info("checking against fp32 on %d image(s) of the run's own data (%s)%s", len(own), Path(own[0]).parent,
                  " and pydicom-data's RG1_UNCI.dcm" if paths else "")
    if not paths + own:
        raise CheckpointError(
            "no real image to verify against: the run's data is absent and pydicom-data is not installed "
            "(pip install pydicom-data)"
        )
    return paths + own


def reference_inputs(config: dict[str, Any] | None, preprocessing: dict[str, Any], n: int = 4) -> np.ndarray:
    """`reference_images` decoded and preprocessed exactly as the Predictor does: (N, C, H, W) float32."""
    transform = build_transforms(preprocessing, train=False)
    return np.stack([transform(read_image(p).pixels).numpy() for p in reference_images(config, n)])
