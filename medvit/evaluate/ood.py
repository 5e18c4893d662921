"""Image-level out-of-distribution check: how far an image's pooled features lie from the run's training images.

A PACS holds radiographs of every body part, and many CR/DX files carry no BodyPartExamined; PNG and JPEG
uploads never do. The model scores a hand or a CT slice as readily as a chest, so where the tags cannot say,
the features must: the squared Mahalanobis distance of the backbone's pooled features (the head's input)
from their training mean, with a Ledoit-Wolf shrunk covariance (a few hundred images, hundreds of dimensions).
The threshold is a high quantile (0.99) of *out-of-fold* training distances (fitted on 4/5 of the images,
measured on the rest): in-sample distances are biased low and would flag ordinary held-out chests.

The statistics are a run-folder file (`runs.OOD`, safetensors + metadata, bound to the weights' SHA-256),
written by `medvit calibrate` from eager fp32 features, so the threshold means the same on every engine: the
features come from the served pass itself when they stay within `FEATURE_DRIFT` of eager fp32's, else from a second
fp32 pass (`medvit.inference.features`). A hit is a warning on the prediction, never a refusal.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.utils.data import DataLoader

from medvit._io import load_tensors, save_tensors
from medvit.data.datasets import XrayDataset
from medvit.data.dicom import ImageMeta
from medvit.data.transforms import build_transforms
from medvit.errors import CheckpointError
from medvit.runs import OOD, RunInfo

_log = logging.getLogger(__name__)

QUANTILE = 0.99  # share of held-out training images that must pass
# Max |distance - eager fp32 distance| / threshold for an engine's own features to feed the check: only an image
# that close to the threshold can flip (`medvit.inference.features`; fp32 graphs measure ~1e-6).
FEATURE_DRIFT = 0.05
FOLDS = 5
MAX_FIT_IMAGES = 4000  # a random subset of larger training sets: the covariance needs hundreds, not millions


@dataclass(frozen=True)
class OodStats:
    """Mean and shrunk precision of the training features, and the distance above which an image is flagged."""

    mean: np.ndarray  # (D,)
    precision: np.ndarray  # (D, D)
    threshold: float
    quantile: float
    n_images: int
    weights_sha256: str

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each row of (N, D) features."""
        d = np.asarray(features, dtype=np.float64) - self.mean
        return np.einsum("ij,jk,ik->i", d, self.precision, d)

    def warning(self, distance: float) -> str | None:
        """The message a reader sees when `distance` is over the threshold, else None."""
        if distance <= self.threshold:
            return None
        return (
            f"out of distribution: this image's features are far from the model's training chest radiographs "
            f"(Mahalanobis distance {distance:.0f} > {self.threshold:.0f}, which {100 * self.quantile:.0f}% of "
            "held-out training images stay under); check that it is a frontal chest radiograph"
        )

    def save(self, path: str | os.PathLike) -> None:
        tensors = {"mean": torch.from_numpy(self.mean), "precision": torch.from_numpy(self.precision)}
        meta = {
            "threshold": repr(self.threshold),
            "quantile": repr(self.quantile),
            "n_images": str(self.n_images),
            "weights_sha256": self.weights_sha256,
            "method": "mahalanobis-ledoit-wolf",
        }
        save_tensors(path, tensors, metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> OodStats:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_tensors(path)
            return cls(
                mean=tensors["mean"].double().numpy(),
                precision=tensors["precision"].double().numpy(),
                threshold=float(meta["threshold"]),
                quantile=float(meta["quantile"]),
                n_images=int(meta["n_images"]),
                weights_sha256=meta["weights_sha256"],
            )
        except (KeyError, ValueError, OSError, SafetensorError) as e:
            raise CheckpointError(f"{path}: not a medvit OOD statistics file ({e}); rerun `medvit calibrate`") from None


def fit_ood(
    features: np.ndarray, weights_sha256: str, *, quantile: float = QUANTILE, folds: int = FOLDS, seed: int = 0
) -> OodStats:
    """Fit the statistics on (N, D) training features; the threshold comes from out-of-fold distances."""
    from sklearn.covariance import LedoitWolf  # fit-time only: applying the check needs NumPy alone
    from sklearn.model_selection import KFold

    x = np.asarray(features, dtype=np.float64)
    if len(x) < 2 * folds:
        raise ValueError(f"{len(x)} training images are too few for out-of-distribution statistics")
    held_out = np.empty(len(x))
    for fit_idx, test_idx in KFold(folds, shuffle=True, random_state=seed).split(x):
        lw = LedoitWolf().fit(x[fit_idx])
        d = x[test_idx] - lw.location_
        held_out[test_idx] = np.einsum("ij,jk,ik->i", d, lw.precision_, d)
    lw = LedoitWolf().fit(x)
    return OodStats(
        mean=lw.location_,
        precision=lw.precision_,
        threshold=float(np.quantile(held_out, quantile)),
        quantile=quantile,
        n_images=len(x),
        weights_sha256=weights_sha256,
    )


def has_features(model: nn.Module) -> bool:
    """Whether the model exposes pooled features (`forward_features`) the check can use."""
    return callable(getattr(model, "forward_features", None))


def model_features(model: nn.Module, x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Pooled features (N, D) of a preprocessed batch, from an eager fp32 pass (the same on every engine)."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32)
    with torch.inference_mode():
        return model.forward_features(t).float().numpy()  # type: ignore[operator]


def collect_features(model: nn.Module, dataset: Any, batch_size: int = 32) -> np.ndarray:
    """Features of every image of a dataset of (image, labels) pairs, in order."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return np.concatenate([model_features(model, images) for images, _ in loader])


def fit_run_ood(
    model: nn.Module, info: RunInfo, train: pd.DataFrame, batch_size: int = 32, max_images: int = MAX_FIT_IMAGES
) -> OodStats:
    """Fit the statistics on a run's training rows (a seeded subset beyond `max_images`) and save them in the run.

    Raises:
        ValueError: a model without pooled features, or too few training images.
    """
    if not has_features(model):
        raise ValueError(f"{type(model).__name__} exposes no pooled features (forward_features)")
    if len(train) > max_images:
        train = train.sample(max_images, random_state=0)
    dataset = XrayDataset(train.reset_index(drop=True), info.findings, build_transforms(info.preprocessing, False))
    stats = fit_ood(collect_features(model, dataset, batch_size), info.weights_sha256)
    stats.save(Path(info.run_dir) / OOD)
    _log.info(
        "out-of-distribution statistics from %d training images: threshold %.1f -> %s",
        stats.n_images,
        stats.threshold,
        Path(info.run_dir) / OOD,
    )
    return stats


def needs_check(meta: ImageMeta) -> bool:
    """Images whose tags do not say the body part (PNG/JPEG, and DICOMs without BodyPartExamined).

    Tagged non-chest images are refused by `check_chest_frontal`; tagged chests are trusted.
    """
    return not (meta.body_part or "").strip()


def load_ood(info: RunInfo) -> OodStats | None:
    """The run's statistics, or None (with the reason logged) when it has none or they belong to other weights."""
    path = Path(info.run_dir) / OOD
    if not path.is_file():
        _log.debug("%s has no %s: no out-of-distribution check (run `medvit calibrate`)", info.run_dir, OOD)
        return None
    stats = OodStats.load(path)
    if stats.weights_sha256 != info.weights_sha256:
        _log.warning(
            "%s was fitted for other weights: no out-of-distribution check until `medvit calibrate "
            "--ood-only --run %s`",
            path,
            info.run_dir,
        )
        return None
    return stats


def ood_warnings(
    stats: OodStats | None, model: nn.Module, x: np.ndarray | torch.Tensor, mask: Sequence[bool] | None = None,
    features: np.ndarray | None = None,
) -> list[tuple[str, ...]]:
    """Per image of the batch `x`, the out-of-distribution warning (empty where none, or where `mask` is False).

    `features`: the pooled features of `x` from the pass that served the logits, when the engine gives them and
    they were checked against eager fp32 (`medvit.inference.fp32check.feature_drift`); else an eager pass here.
    """
    out: list[tuple[str, ...]] = [() for _ in range(len(x))]
    idx = [i for i in range(len(x)) if mask is None or mask[i]]
    if stats is None or not idx:
        return out
    distances = stats.distance(model_features(model, x[idx]) if features is None else features[idx])
    for i, d in zip(idx, distances, strict=True):
        message = stats.warning(float(d))
        if message:
            out[i] = (message,)
    return out
