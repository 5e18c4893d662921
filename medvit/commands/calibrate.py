"""`medvit calibrate --run RUN_DIR [--method ...] [--threshold ...] [--labels CSV --images DIR]`.

Fits per-finding calibrators and thresholds on the run's patient-disjoint calib split (its val split when it
has none), writes calibration.json, metrics.json (cross-validated on that split) and the README.md model card.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medvit.evaluate.calibration import METHODS, THRESHOLD_RULES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True, metavar="RUN_DIR", help="run folder from `medvit train`")
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="auto",
        help="calibrator; auto picks by patient-grouped cross-validated NLL (default: auto)",
    )
    parser.add_argument(
        "--threshold",
        choices=THRESHOLD_RULES,
        default="sensitivity",
        help="operating threshold rule (default: sensitivity)",
    )
    parser.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.9,
        metavar="S",
        help="sensitivity the threshold must reach on the calibration data (default: 0.9)",
    )
    parser.add_argument("--labels", type=Path, metavar="CSV", help="calibration labels (default: the run's own data)")
    parser.add_argument("--images", type=Path, metavar="DIR", help="image folder for --labels")
    parser.add_argument(
        "--split", help="split to calibrate on (default: calib if present, else val; with --labels: all rows)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-boot", type=int, default=1000, help="patient bootstrap resamples for CIs (0: none)")
    parser.add_argument("--notes", type=Path, metavar="MD", help="markdown added to the model card (kept in the run)")


def run(args: argparse.Namespace) -> int:
    from medvit.errors import ConfigError
    from medvit.evaluate.calibration import cross_validated_probs, fit_calibration
    from medvit.evaluate.modelcard import NOTES, write_model_card
    from medvit.evaluate.report import build_report, labelled_frame, model_logits, run_split_frame, write_metrics
    from medvit.runs import CALIBRATION, METRICS, load_run

    if (args.labels is None) != (args.images is None):
        raise ConfigError("--labels and --images go together")
    if args.notes is not None and not args.notes.is_file():
        raise ConfigError(f"--notes {args.notes}: file not found")
    if not 0 < args.target_sensitivity <= 1:
        raise ConfigError(f"--target-sensitivity must be in (0, 1], got {args.target_sensitivity}")
    model, info = load_run(args.run)
    if args.labels is not None:
        df, split = labelled_frame(args.labels, args.images, info.findings, args.split), args.split
        source = args.labels.name
    else:
        df, split = run_split_frame(info, args.split)
        source = Path(info.config["data"]["labels_csv"]).name
    logits, labels = model_logits(model, info, df, args.batch_size)
    groups = df["patient_id"].to_numpy()
    cal = fit_calibration(
        logits,
        labels,
        info.findings,
        groups,
        method=args.method,
        threshold_rule=args.threshold,
        target_sensitivity=args.target_sensitivity,
    )
    cal.info["fitted_on"].update({"labels": source, "split": split})
    cal.save(args.run / CALIBRATION)

    report = build_report(
        logits,
        labels,
        info.findings,
        groups,
        cal,
        n_boot=args.n_boot,
        probs_calibrated=cross_validated_probs(logits, labels, groups, cal),
    )
    folds = cal.info["selection"]["folds"]
    report["evaluation"] = {
        "description": f"calibration data: {source}"
        + (f", split {split!r}" if split else "")
        + f"; calibrated metrics are out-of-fold ({folds} patient-grouped folds), AUROC and thresholds in-sample",
        "labels": source,
        "split": split,
        "calibration_in_sample": False,
        "cross_validated": True,
    }
    report["run"] = {"dir": str(args.run), "model": info.model_name, "weights_sha256": info.weights_sha256}
    write_metrics(report, args.run / METRICS)
    if args.notes is not None:
        (args.run / NOTES).write_text(args.notes.read_text())
    write_model_card(args.run)
    print(
        json.dumps(
            {
                "calibration": str(args.run / CALIBRATION),
                "chosen": cal.info["chosen"],
                "n_images": report["n_images"],
                "mean_auroc": round(report["mean_auroc"], 4),
                "mean_ece_uncalibrated": round(report["mean_ece_uncalibrated"], 4),
                "mean_ece_cross_validated": round(report["mean_ece"], 4),
            },
            indent=2,
        )
    )
    return 0
