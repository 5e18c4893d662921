"""`medvit evaluate --run RUN_DIR --labels CSV --images DIR --out OUT_DIR [--split NAME]`, or `--baseline pixels`
instead of `--run` for the pixel baseline (CV on the labels, or fitted on `--fit-labels`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medvit.commands.calibrate import add_engine_argument
from medvit.errors import ConfigError, DatasetError
from medvit.rundir import check_run_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, metavar="RUN_DIR", help="run folder from `medvit train`")
    parser.add_argument("--baseline", choices=("pixels",), help="instead of a run: the pixel baseline (PCA(30) of "
                        "32x32 thumbnails + logistic regression per finding), patient-wise CV on --labels")
    parser.add_argument("--folds", type=int, default=5, metavar="K", help="--baseline: CV folds (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="--baseline: fold seed, as data.split.seed (default: 0)")
    parser.add_argument("--fit-labels", type=Path, metavar="CSV", help="--baseline: fit on this set, score --labels")
    parser.add_argument("--fit-images", type=Path, metavar="DIR", help="image folder for --fit-labels")
    parser.add_argument(
        "--labels",
        type=Path,
        required=True,
        metavar="CSV",
        help="labels CSV, NIH Data_Entry or wide (one column per finding) format",
    )
    parser.add_argument("--images", type=Path, required=True, metavar="DIR", help="folder the CSV's paths are under")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT_DIR", help="where metrics.json and plots go")
    parser.add_argument("--split", help="evaluate only rows with this split (default: all rows)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-boot", type=int, default=1000, help="patient bootstrap resamples for CIs (0: none)")
    parser.add_argument("--no-plots", action="store_true", help="skip ROC and reliability plots")
    add_engine_argument(parser)


def run(args: argparse.Namespace) -> int:
    if (args.run is None) == (args.baseline is None):
        raise ConfigError("give either --run RUN_DIR or --baseline pixels")
    if not args.labels.is_file():  # the arguments before the heavy imports: a typo answers at once
        raise DatasetError(f"labels CSV not found: {args.labels}")
    if not args.images.is_dir():
        raise DatasetError(f"image folder not found: {args.images}")
    if args.run is not None:
        check_run_dir(args.run)
    if args.baseline is not None:
        from medvit.evaluate.baseline import BASELINE_JSON, evaluate_baseline

        result = evaluate_baseline(args.baseline, args.labels, args.images, args.out, folds=args.folds,
                                   seed=args.seed, fit_labels=args.fit_labels, fit_images=args.fit_images)
        keys = ("baseline", "n_images", "folds", "fold_mean_auroc", "cv_mean_auroc", "cv_sd_auroc", "mean_auroc")
        print(json.dumps({"metrics": str(args.out / BASELINE_JSON), **{k: result[k] for k in keys if k in result}},
                         indent=2))
        return 0
    from medvit.evaluate.pipeline import evaluate_run
    from medvit.runs import METRICS

    report = evaluate_run(
        args.run, args.labels, args.images, args.out, split=args.split, batch_size=args.batch_size,
        n_boot=args.n_boot, plots=not args.no_plots, engine=args.engine,
    )
    summary = {k: report[k] for k in ("n_images", "mean_auroc", "mean_ece", "mean_ece_uncalibrated", "served_engine")}
    print(json.dumps({"metrics": str(args.out / METRICS), **summary}, indent=2))
    return 0
