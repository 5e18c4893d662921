"""Run-level pipelines behind `medvit calibrate` and `medvit evaluate`: load the run, compute its logits, fit
calibration or build the report, and write calibration.json, metrics.json and the model card.

Both measure the engine that `medvit predict` and the review app serve on this machine (`auto`'s choice, or
$MEDVIT_BACKEND) beside eager fp32, so the metrics a clinician reads describe the numbers they are shown. This is
the one evaluate module that uses `medvit.inference` (to build that engine); nothing in inference imports it.
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
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from medvit._io import atomic_write_bytes
from medvit.config import Config
from medvit.data.datasets import XrayDataset, load_labels
from medvit.data.splits import split_frame
from medvit.data.transforms import build_transforms
from medvit.errors import ConfigError, DatasetError
from medvit.evaluate.calibration import Calibration, cross_validated_probs, fit_calibration
from medvit.evaluate.modelcard import write_model_card
from medvit.evaluate.ood import OodStats, fit_run_ood
from medvit.evaluate.report import build_report, compare_engines, plot_curves, write_metrics
from medvit.evaluate.versions import register_refit
from medvit.inference import AUTO, BACKENDS
from medvit.inference.engines import Backend
from medvit.inference.predictor import BACKEND_ENV, Predictor, load_calibration
from medvit.runs import CALIBRATION, CARD_NOTES, CONFIG, METRICS, RunInfo, load_run, save_timm_backbone

_log = logging.getLogger(__name__)

FP32 = "torch"  # the eager fp32 engine every other engine is compared with


def collect_logits(
    forward: nn.Module | Backend, dataset: Any, batch_size: int = 32, num_workers: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Run a model (in eval mode, without autograd) or an inference engine over a dataset of (image, labels)
    pairs; returns (N, K) float32 logits and labels (NaN kept), in dataset order."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    module = forward if isinstance(forward, nn.Module) else None
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    logits, labels = [], []
    try:
        with torch.inference_mode():
            for images, y in tqdm(loader, desc="evaluate", unit="batch", leave=False):
                out = forward(images)
                logits.append(out.float().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out))
                labels.append(y.numpy())
    finally:
        if module is not None:
            module.train(was_training)
    return np.concatenate(logits).astype(np.float32), np.concatenate(labels).astype(np.float32)


def labelled_frame(
    labels_csv: str | os.PathLike, images_dir: str | os.PathLike, findings: tuple[str, ...], split: str | None = None
) -> pd.DataFrame:
    """Rows of a labels CSV (NIH Data_Entry or wide format) to evaluate, optionally one split only."""
    df = load_labels(labels_csv, images_dir, findings)
    if split is not None:
        available = sorted(df["split"].dropna().unique()) if "split" in df.columns else []
        df = df[df["split"] == split]
        if df.empty:
            raise DatasetError(f"no rows with split {split!r} in {labels_csv} (splits present: {available or 'none'})")
    return df.reset_index(drop=True)


def run_split_frame(info: RunInfo, split: str | None = None) -> tuple[pd.DataFrame, str]:
    """The run's own held-out rows: `split`, else 'calib' when the run's split has one, else its val split.

    The split is rebuilt exactly as training did (the CSV's column, or the seeded patient-wise assignment).
    """
    data = info.config.get("data")
    if not data:
        raise DatasetError(f"{info.run_dir / CONFIG} records no training data; pass --labels CSV --images DIR")
    csv, root = Path(data["labels_csv"]), Path(data["images_root"])
    if not csv.is_file() or not root.is_dir():
        raise DatasetError(
            f"the run's labels {csv} / images {root} are not on this machine; pass --data-root DIR (the folder that "
            "now holds them) or --labels CSV --images DIR"
        )
    if split is None and info.model_args.get("ensemble"):
        raise DatasetError(f"{info.run_dir} is a fold ensemble: every training image was seen by some member, so it "
                           "has no held-out split; pass --labels CSV --images DIR of other patients")
    cfg = Config.model_validate(info.config)
    df = split_frame(cfg)
    if split is None:
        split = "calib" if (df["split"] == "calib").any() else cfg.data.split.val_name
    out = df[df["split"] == split].reset_index(drop=True)
    if out.empty:
        raise DatasetError(f"the run's data ({csv}) has no {split!r} rows to calibrate or evaluate on")
    return out, split


def _dataset(info: RunInfo, df: pd.DataFrame) -> XrayDataset:
    return XrayDataset(df, info.findings, build_transforms(info.preprocessing, train=False))


def model_logits(model: nn.Module, info: RunInfo, df: pd.DataFrame, batch_size: int = 32
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of a run's model on the rows of `df`, with the run's own eval preprocessing."""
    return collect_logits(model, _dataset(info, df), batch_size)


def served_engines(
    info: RunInfo, df: pd.DataFrame, fp32_logits: np.ndarray, labels: np.ndarray, calibration: Calibration,
    engine: str = AUTO, batch_size: int = 32,
) -> dict[str, Any]:
    """The metrics.json block on the engine served here: its name, how it was chosen, and its results next to
    eager fp32 on the same rows (see `compare_engines`). A non-fp32 engine reads the images a second time.

    `engine`: "auto" (the self-check the app and `medvit predict` use, $MEDVIT_BACKEND winning) or a backend name.
    """
    requested = (os.environ.get(BACKEND_ENV) or AUTO) if engine == AUTO else engine
    served = Predictor.from_dir(info.run_dir, backend=engine).backend
    logits = {FP32: fp32_logits}
    if served.name != FP32:
        logits[served.name] = collect_logits(served, _dataset(info, df), batch_size)[0]
    engines = compare_engines(logits, labels, calibration, reference=FP32)
    block = engines[served.name]
    _log.info("served engine %s: mean AUROC %.4f (fp32 %.4f), max |dp| %.2g, %d of %d flags differ from fp32",
              served.name, block["mean_auroc"], engines[FP32]["mean_auroc"], block["max_abs_dp"],
              block["flags_changed"], block["n_outputs"])
    chosen_by = ("chosen by the auto self-check on this machine" if requested == AUTO
                 else "requested explicitly ($MEDVIT_BACKEND or --engine)")
    return {"served_engine": served.name, "served_engine_chosen_by": chosen_by, "engines": engines}


def _check_engine(engine: str) -> None:
    """Refuse an unknown --engine before any work, not after calibration.json is written."""
    if engine not in (AUTO, *BACKENDS):
        raise ConfigError(f"--engine {engine}: unknown engine; choose {AUTO} or one of {', '.join(BACKENDS)}")


def refit_ood(model: nn.Module, info: RunInfo, batch_size: int = 32) -> OodStats | None:
    """Fit the out-of-distribution statistics (`medvit.evaluate.ood`) on the run's training split; None, with a
    warning, when the run's training data or pooled features are not available (the check is then off)."""
    try:
        df, _ = run_split_frame(info, Config.model_validate(info.config).data.split.train_name)
        return fit_run_ood(model, info, df, batch_size)
    except (DatasetError, ValueError) as e:
        _log.warning("no out-of-distribution check for %s: %s", info.run_dir, e)
        return None


@dataclass(frozen=True)
class CalibrateResult:
    """What `calibrate_run` wrote: the calibration and the metrics.json report."""

    calibration_path: Path
    calibration: Calibration
    report: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """The short JSON `medvit calibrate` prints."""
        r = self.report
        return {
            "calibration": str(self.calibration_path),
            "chosen": self.calibration.info["chosen"],
            "n_images": r["n_images"],
            "mean_auroc": round(r["mean_auroc"], 4),
            "mean_ece_uncalibrated": round(r["mean_ece_uncalibrated"], 4),
            "mean_ece_cross_validated": round(r["mean_ece"], 4),
            "served_engine": r["served_engine"],
        }


def calibrate_run(
    run_dir: str | os.PathLike,
    *,
    labels_csv: str | os.PathLike | None = None,
    images_dir: str | os.PathLike | None = None,
    split: str | None = None,
    method: str = "auto",
    threshold_rule: str = "sensitivity",
    target_sensitivity: float = 0.9,
    batch_size: int = 32,
    n_boot: int = 1000,
    notes: str | os.PathLike | None = None,
    engine: str = AUTO,
    data_root: str | os.PathLike | None = None,
) -> CalibrateResult:
    """Fit per-finding calibrators and thresholds, then write calibration.json, metrics.json (cross-validated on
    the calibration data), the timm backbone and the model card into the run folder.

    The data: `labels_csv` + `images_dir` (all rows, or `split`), else the run's own calib split (its val split
    when it has none; `data_root`: the folder that now holds that data, see `medvit.rundir`). `notes`: markdown
    kept in the run and shown in the card.

    Raises:
        ConfigError: inconsistent arguments. DatasetError: no usable labels. CheckpointError: unreadable run.
    """
    if (labels_csv is None) != (images_dir is None):
        raise ConfigError("--labels and --images go together")
    if notes is not None and not Path(notes).is_file():
        raise ConfigError(f"--notes {notes}: file not found")
    if not 0 < target_sensitivity <= 1:
        raise ConfigError(f"--target-sensitivity must be in (0, 1], got {target_sensitivity}")
    _check_engine(engine)
    run_dir = Path(run_dir)
    model, info = load_run(run_dir, data_root=data_root)
    if labels_csv is not None and images_dir is not None:
        df, source = labelled_frame(labels_csv, images_dir, info.findings, split), Path(labels_csv).name
    else:
        df, split = run_split_frame(info, split)
        source = Path(info.config["data"]["labels_csv"]).name
    logits, labels = model_logits(model, info, df, batch_size)
    groups = df["patient_id"].to_numpy()
    cal = fit_calibration(logits, labels, info.findings, groups, method=method, threshold_rule=threshold_rule,
                          target_sensitivity=target_sensitivity)
    cal.info["fitted_on"].update({"labels": source, "split": split})
    cal.save(run_dir / CALIBRATION)
    version = register_refit(run_dir)  # a run with site versions keeps this fit as a new one

    report = build_report(logits, labels, info.findings, groups, cal, n_boot=n_boot,
                          probs_calibrated=cross_validated_probs(logits, labels, groups, cal))
    folds = cal.info["selection"]["folds"]
    report["evaluation"] = {
        "description": f"calibration data: {source}" + (f", split {split!r}" if split else "")
        + f"; calibrated metrics are out-of-fold ({folds} patient-grouped folds), AUROC and thresholds in-sample",
        "labels": source,
        "split": split,
        "calibration_in_sample": False,
        "cross_validated": True,
    }
    report["run"] = {"dir": str(run_dir), "model": info.model_name, "weights_sha256": info.weights_sha256}
    report["calibration_version"] = version
    report |= served_engines(info, df, logits, labels, cal, engine, batch_size)
    write_metrics(report, run_dir / METRICS)
    if notes is not None:
        atomic_write_bytes(run_dir / CARD_NOTES, Path(notes).read_bytes())
    save_timm_backbone(run_dir, model)  # the card says `library_name: timm`: this file makes that true
    refit_ood(model, info, batch_size)
    write_model_card(run_dir)
    return CalibrateResult(run_dir / CALIBRATION, cal, report)


def evaluate_run(
    run_dir: str | os.PathLike,
    labels_csv: str | os.PathLike,
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str | None = None,
    batch_size: int = 32,
    n_boot: int = 1000,
    plots: bool = True,
    engine: str = AUTO,
) -> dict[str, Any]:
    """Evaluate a run on a labelled set; writes OUT_DIR/metrics.json (and plots) and returns the report.

    When OUT_DIR is the run folder, its model card is rewritten too, since the card shows that metrics.json.
    """
    _check_engine(engine)
    model, info = load_run(run_dir)
    calibration, version = load_calibration(info)
    df = labelled_frame(labels_csv, images_dir, info.findings, split)
    logits, labels = model_logits(model, info, df, batch_size)
    report = build_report(logits, labels, info.findings, df["patient_id"].to_numpy(), calibration, n_boot=n_boot)
    fitted = calibration.info.get("fitted_on", {})
    in_sample = fitted.get("labels") == Path(labels_csv).name and fitted.get("split") == split and split is not None
    if in_sample:
        _log.warning("evaluating on the split the calibrators were fitted on: 'after' metrics are optimistic")
    report["evaluation"] = {
        "description": f"{Path(labels_csv).name}" + (f", split {split!r}" if split else ", all rows"),
        "labels": str(labels_csv),
        "split": split,
        "calibration_in_sample": in_sample,
    }
    report["run"] = {"dir": str(run_dir), "model": info.model_name, "weights_sha256": info.weights_sha256}
    report["calibration_version"] = version
    report |= served_engines(info, df, logits, labels, calibration, engine, batch_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(report, out / METRICS)
    if plots:
        plot_curves(out, logits, labels, info.findings, calibration)
    if out.resolve() == Path(run_dir).resolve():
        write_model_card(run_dir)
    _log.info("mean AUROC %.3f, mean ECE %.3f (uncalibrated %.3f) on %d images -> %s", report["mean_auroc"],
              report["mean_ece"], report["mean_ece_uncalibrated"], report["n_images"], out / METRICS)
    return report
