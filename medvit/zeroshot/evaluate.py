"""Zero-shot evaluation on a labelled set: per-finding pair AUROC, optionally per-pair temperatures fitted on
another split, written as metrics.json, predictions.csv and plots (the library behind `medvit zeroshot-eval`).

metrics.json is built by `medvit.evaluate.report.build_report` from the pair logits z = logit_scale * (s_pos - s_neg)
(so sigmoid(z) is the uncalibrated pair probability); it therefore has exactly the finding-level keys of
`medvit evaluate`, plus a `zeroshot` block naming the model, prompts and calibration status.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from medvit._io import atomic_write_bytes
from medvit.data.datasets import label_matrix, load_labels
from medvit.data.dicom import read_image
from medvit.errors import DatasetError
from medvit.evaluate.calibration import Calibration, Temperature
from medvit.evaluate.report import build_report, plot_curves, write_metrics
from medvit.findings import ALL_FINDINGS, resolve_findings
from medvit.runs import METRICS
from medvit.zeroshot.prompts import PromptPair
from medvit.zeroshot.scorer import CALIBRATED, UNCALIBRATED, ZeroShotScorer

_log = logging.getLogger(__name__)

TEMPERATURES = "temperatures.json"  # per-pair temperatures fitted with --fit-split (`zeroshot --temperatures`)
PREDICTIONS = "predictions.csv"  # one row per evaluated image: ids and each finding's pair probability
_CHUNK = 64  # images decoded and encoded at a time, so large sets fit in memory


def _split_rows(df: pd.DataFrame, split: str | None, labels_csv: str | os.PathLike) -> pd.DataFrame:
    part = (df if split is None else df[df["split"] == split]).reset_index(drop=True)
    if part.empty:
        raise DatasetError(f"no images in split {split!r} of {labels_csv}")
    return part


def pair_similarities_of(
    scorer: ZeroShotScorer, paths: Sequence[str | os.PathLike], pairs: Sequence[PromptPair], desc: str = "zero-shot"
) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) s_pos and s_neg of image files, decoded and encoded in chunks so large sets fit in memory."""
    chunks = [scorer.pair_similarities([read_image(p) for p in paths[s:s + _CHUNK]], pairs)
              for s in tqdm(range(0, len(paths), _CHUNK), desc=desc, leave=False)]
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


def pair_calibration(scorer: ZeroShotScorer, findings: Sequence[str]) -> Calibration:
    """The scorer's per-pair temperatures as a `Calibration` of the model-scale logits (identity when none)."""
    if not any(scorer.temperature(f)[1] == CALIBRATED for f in findings):
        return Calibration.identity(findings)
    # temperatures relative to the model scale: sigmoid(z / (T * scale)) == softmax([s_pos, s_neg] / T)[0]
    scale = scorer.logit_scale
    cals = tuple(Temperature(scorer.temperature(f)[0] * scale) for f in findings)
    return Calibration(tuple(findings), cals, np.full(len(findings), 0.5), "temperature",
                       {"chosen": "per-pair temperature (zero-shot)"})


def evaluate_zeroshot(
    scorer: ZeroShotScorer,
    labels_csv: str | os.PathLike,
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    findings: Sequence[str] = ALL_FINDINGS,
    split: str | None = None,
    fit_split: str | None = None,
    n_boot: int = 200,
    seed: int = 0,
    plots: bool = True,
) -> dict[str, Any]:
    """Pair-mode zero-shot evaluation of `findings` on `split`; returns the metrics.json report.

    With `fit_split`, one temperature per pair is first fitted on that split and saved to OUT_DIR/temperatures.json,
    so the reported calibrated metrics are on images the temperatures never saw (when the splits differ).
    """
    findings = resolve_findings(findings)
    df = load_labels(labels_csv, images_dir, findings)
    pairs = scorer.finding_pairs(findings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fit_split:
        fit_df = _split_rows(df, fit_split, labels_csv)
        fit_pos, fit_neg = pair_similarities_of(scorer, list(fit_df["path"]), pairs, f"zero-shot {fit_split}")
        scorer.fit_temperatures(pairs, fit_pos, fit_neg, label_matrix(fit_df, findings))
        scorer.save_temperatures(out / TEMPERATURES)

    eval_df = _split_rows(df, split, labels_csv)
    s_pos, s_neg = pair_similarities_of(scorer, list(eval_df["path"]), pairs, f"zero-shot {split or 'all'}")
    scale = scorer.logit_scale
    logits = scale * (s_pos - s_neg)
    labels = label_matrix(eval_df, findings)
    calibration = pair_calibration(scorer, findings)
    report = build_report(logits, labels, findings, eval_df["patient_id"].to_numpy(), calibration,
                          n_boot=n_boot, seed=seed)
    report["zeroshot"] = {
        "model": scorer.backend.model_id,
        "mode": "pair",
        "split": split,
        "normalization": scorer.normalization,
        "logit_scale": scale,
        "calibration": {f: scorer.temperature(f)[1] for f in findings},
        "temperatures": {f: scorer.temperature(f)[0] for f in findings},
        "prompts": {p.name: {"positive": list(p.positive), "negative": list(p.negative)} for p in pairs},
    }
    write_metrics(report, out / METRICS)
    probs = calibration.apply(logits)
    pred = eval_df[["image_id", "patient_id"]].copy()
    for k, f in enumerate(findings):
        pred[f] = probs[:, k]
    atomic_write_bytes(out / PREDICTIONS, pred.to_csv(index=False).encode())
    if plots:
        plot_curves(out, logits, labels, findings, calibration)
    _log.info("zero-shot %s: mean AUROC %.3f on %d images -> %s", scorer.backend.model_id, report["mean_auroc"],
              report["n_images"], out / METRICS)
    return report


def calibration_label(report: dict[str, Any]) -> str:
    """How the report's pair probabilities were calibrated, in a few words for a summary line."""
    status = report["zeroshot"]["calibration"].values()
    return "uncalibrated" if all(s == UNCALIBRATED for s in status) else "per-pair temperatures"
