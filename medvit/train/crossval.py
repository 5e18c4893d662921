"""Patient-wise k-fold cross-validation of a recipe (`medvit train --folds K`): choose recipes on all images.

With a few hundred images, one 51-image val split cannot tell recipes apart. Here every image is held out exactly
once: fold i is an ordinary run folder (`fold_i/`, split policy `kfold`) trained on the other folds, and its
model's logits on fold i are that image's out-of-fold (OOF) logits. The CV folder holds `oof.csv` and `cv.json`:
each fold's mean AUROC, their mean and spread, the pooled OOF mean AUROC, and the pixel baseline
(`medvit.evaluate.baseline`) on the same folds. Finished folds are skipped and an interrupted fold resumes, so a
long CV can be run in slices.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from medvit._io import load_tensors, read_json, save_tensors, write_json
from medvit.config import Config
from medvit.data.datasets import XrayDataset, label_matrix
from medvit.data.splits import split_frame
from medvit.data.transforms import build_transforms
from medvit.errors import ConfigError
from medvit.evaluate.baseline import cross_validate_pixels
from medvit.evaluate.metrics import mean_auroc
from medvit.runs import CONFIG, CV_SUMMARY, FOLD_DIR, OOF, SUMMARY, WEIGHTS, load_run, write_run_config
from medvit.train.resume import STATE
from medvit.train.supervised import fit

_log = logging.getLogger(__name__)

LOGIT = "logit/"  # oof.csv column prefix of a finding's logit


def fold_config(cfg: Config, folds: int, fold: int) -> Config:
    """`cfg` with fold `fold` of `folds` patient-wise folds as its val split (seeded by `data.split.seed`)."""
    split = cfg.data.split.model_copy(update={"policy": "kfold", "folds": folds, "fold": fold})
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"split": split})})


@dataclass(frozen=True)
class OutOfFold:
    """Every image's logits from the fold model that never saw it, with its fold and labels (rows = images)."""

    frame: pd.DataFrame  # image_id, patient_id, fold (and path, label columns when built from the fold runs)
    logits: np.ndarray  # (N, K)
    labels: np.ndarray  # (N, K), NaN = unknown
    findings: tuple[str, ...]

    def to_csv(self, path: str | os.PathLike) -> None:
        table = self.frame[["image_id", "patient_id", "fold"]].copy()
        for k, f in enumerate(self.findings):
            table[f] = self.labels[:, k]
        for k, f in enumerate(self.findings):
            table[LOGIT + f] = self.logits[:, k]
        table.to_csv(path, index=False)

    @classmethod
    def read_csv(cls, path: str | os.PathLike) -> OutOfFold:
        table = pd.read_csv(path, dtype={"image_id": str, "patient_id": str})
        findings = tuple(c.removeprefix(LOGIT) for c in table.columns if c.startswith(LOGIT))
        return cls(
            table[["image_id", "patient_id", "fold"]],
            table[[LOGIT + f for f in findings]].to_numpy(),
            table[list(findings)].to_numpy(dtype=np.float64),
            findings,
        )


@torch.inference_mode()
def _logits(model: torch.nn.Module, dataset: XrayDataset, batch_size: int) -> np.ndarray:
    model.eval()
    loader: DataLoader = DataLoader(dataset, batch_size=batch_size)  # type: ignore[arg-type]
    return np.concatenate([model(x).float().numpy() for x, _ in loader])


def _train_fold(cfg: Config, run_dir: Path) -> None:
    if (run_dir / SUMMARY).is_file():
        _log.info("%s is finished; skipping it", run_dir)
    elif (run_dir / STATE).is_file():
        fit(cfg, resume=run_dir)
    else:
        fit(cfg, out_dir=run_dir)


def out_of_fold(cfg: Config, cv_dir: str | os.PathLike, folds: int) -> OutOfFold:
    """Each fold run's logits on its own held-out fold, gathered in the labels' row order."""
    parts = []
    for i in range(folds):
        fcfg = fold_config(cfg, folds, i)
        df = split_frame(fcfg)
        held = df[df["split"] == fcfg.data.split.val_name].reset_index(drop=True)
        model, info = load_run(Path(cv_dir) / FOLD_DIR.format(i))
        ds = XrayDataset(held, info.findings, build_transforms(info.preprocessing, train=False), cache=False)
        parts.append((held.assign(fold=i), _logits(model, ds, cfg.train.eval_batch_size)))
    frame = pd.concat([p[0] for p in parts], ignore_index=True)
    logits = np.concatenate([p[1] for p in parts])
    findings = tuple(cfg.data.findings)
    return OutOfFold(
        frame[["image_id", "patient_id", "path", "fold", *findings]], logits, label_matrix(frame, findings), findings
    )


def summarize(oof: OutOfFold, baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """cv.json: each fold's mean AUROC, mean +- sd over folds, pooled OOF mean AUROC (and the baseline's)."""
    folds = oof.frame["fold"].to_numpy()
    per_fold = [mean_auroc(oof.labels[folds == f], oof.logits[folds == f], oof.findings)[0] for f in np.unique(folds)]
    pooled, per_finding = mean_auroc(oof.labels, oof.logits, oof.findings)
    out: dict[str, Any] = {
        "folds": len(per_fold),
        "n_images": len(folds),
        "n_patients": int(oof.frame["patient_id"].nunique()),
        "fold_mean_auroc": per_fold,
        "cv_mean_auroc": float(np.mean(per_fold)),
        "cv_sd_auroc": float(np.std(per_fold, ddof=1)),
        "pooled_oof_mean_auroc": pooled,
        "pooled_oof_auroc_per_finding": per_finding,
    }
    if baseline is not None:
        b = baseline["fold_mean_auroc"]
        out["baseline_pixels"] = {
            "fold_mean_auroc": b,
            "cv_mean_auroc": float(np.mean(b)),
            "cv_sd_auroc": float(np.std(b, ddof=1)),
            "pooled_oof_mean_auroc": baseline["pooled_mean_auroc"],
        }
        out["cv_mean_auroc_minus_baseline"] = out["cv_mean_auroc"] - out["baseline_pixels"]["cv_mean_auroc"]
    return out


@dataclass(frozen=True)
class CrossValidation:
    """What `cross_validate` wrote: the cv.json summary and the out-of-fold logits behind it."""

    summary: dict[str, Any]
    oof: OutOfFold


def cross_validate(cfg: Config, cv_dir: str | os.PathLike, folds: int, *, baseline: bool = True) -> CrossValidation:
    """Train `folds` patient-wise fold runs of `cfg` under `cv_dir`, then write oof.csv and cv.json.

    Raises:
        ConfigError: fewer than 2 folds, or `cv_dir` holds a CV of another fold count.
    """
    if folds < 2:
        raise ConfigError(f"--folds {folds}: cross-validation needs at least 2 folds")
    cv_dir = Path(cv_dir)
    extra = cv_dir / FOLD_DIR.format(folds)
    if extra.is_dir():
        raise ConfigError(f"{cv_dir} holds a cross-validation with more than {folds} folds; choose another --out")
    cv_dir.mkdir(parents=True, exist_ok=True)
    for i in range(folds):
        _log.info("cross-validation: fold %d of %d", i + 1, folds)
        _train_fold(fold_config(cfg, folds, i), cv_dir / FOLD_DIR.format(i))
    oof = out_of_fold(cfg, cv_dir, folds)
    oof.to_csv(cv_dir / OOF)
    fold = oof.frame["fold"].to_numpy()
    pixels = cross_validate_pixels(oof.frame, oof.findings, fold, cfg.seed) if baseline else None
    summary = {"config": cfg.model_dump(mode="json"), **summarize(oof, pixels)}
    write_json(cv_dir / CV_SUMMARY, summary)
    _log.info(
        "CV mean AUROC %.3f +- %.3f over %d folds (pooled out-of-fold %.3f)%s",
        summary["cv_mean_auroc"],
        summary["cv_sd_auroc"],
        folds,
        summary["pooled_oof_mean_auroc"],
        f"; pixel baseline {summary['baseline_pixels']['cv_mean_auroc']:.3f}" if pixels else "",
    )
    return CrossValidation(summary, oof)


def build_fold_ensemble(cfg: Config, cv_dir: str | os.PathLike, folds: int) -> Path:
    """Make `cv_dir` itself one run folder serving the mean of its fold models (`medvit.model.ensemble`).

    Writes config.json (the fold runs' model with `"ensemble": folds`), model.safetensors (`members.<i>.*`) and
    train_summary.json (all images; each member saw all but its own fold). Its calibration must come from the
    out-of-fold logits (`medvit.evaluate.oof`): the ensemble has no unseen images of its own.
    """
    cv_dir = Path(cv_dir)
    runs = [cv_dir / FOLD_DIR.format(i) for i in range(folds)]
    metas = [read_json(r / CONFIG) for r in runs]
    for i, meta in enumerate(metas[1:], start=1):
        if any(meta[k] != metas[0][k] for k in ("findings", "preprocessing", "model")):
            raise ConfigError(f"{runs[i]} differs from {runs[0]} in findings, preprocessing or model")
    state = {f"members.{i}.{k}": v for i, r in enumerate(runs) for k, v in load_tensors(r / WEIGHTS).items()}
    save_tensors(cv_dir / WEIGHTS, state, metadata={"format": "pt"})
    write_run_config(
        cv_dir,
        fold_config(cfg, folds, 0).model_dump(mode="json"),
        metas[0]["findings"],
        metas[0]["preprocessing"],
        {**metas[0]["model"], "ensemble": folds},
    )
    members = [read_json(r / SUMMARY) for r in runs]
    n = sum(m["val_images"] for m in members)
    write_json(
        cv_dir / SUMMARY,
        {
            **{
                k: members[0][k]
                for k in ("epochs_run", "select", "saved_epoch", "weights", "device", "precision", "torch")
            },
            "ensemble": folds,
            "train_images": n,
            "train_patients": sum(m["val_patients"] for m in members),
            "val_images": n,
            "val_patients": sum(m["val_patients"] for m in members),
            "train_seconds": round(sum(m["train_seconds"] for m in members), 1),
            "members": [{"fold": i, **m} for i, m in enumerate(members)],
        },
    )
    _log.info("fold ensemble of %d members -> %s", folds, cv_dir / WEIGHTS)
    return cv_dir
