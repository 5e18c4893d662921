"""`medvit evaluate --run RUN_DIR --labels CSV --images DIR --out OUT_DIR [--split NAME]`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medvit.commands.calibrate import add_engine_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True, metavar="RUN_DIR", help="run folder from `medvit train`")
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
    from medvit.evaluate.pipeline import evaluate_run
    from medvit.runs import METRICS

    report = evaluate_run(
        args.run, args.labels, args.images, args.out, split=args.split, batch_size=args.batch_size,
        n_boot=args.n_boot, plots=not args.no_plots, engine=args.engine,
    )
    summary = {k: report[k] for k in ("n_images", "mean_auroc", "mean_ece", "mean_ece_uncalibrated", "served_engine")}
    print(json.dumps({"metrics": str(args.out / METRICS), **summary}, indent=2))
    return 0
