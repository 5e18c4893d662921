"""`medvit calibrate --run RUN_DIR [--method ...] [--threshold ...] [--labels CSV --images DIR]`.

Fits per-finding calibrators and thresholds on the run's patient-disjoint calib split (its val split when it
has none), writes calibration.json, metrics.json (cross-validated on that split, with the served inference engine
beside fp32) and the README.md model card; see `medvit.evaluate.pipeline.calibrate_run`.
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
    parser.add_argument("--data-root", type=Path, metavar="DIR",
                        help="the folder that now holds the run's own training data, when it moved since training "
                        "(default: $MEDVIT_DATA_ROOT, else the paths in the run's config.json)")
    parser.add_argument(
        "--split", help="split to calibrate on (default: calib if present, else val; with --labels: all rows)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-boot", type=int, default=1000, help="patient bootstrap resamples for CIs (0: none)")
    parser.add_argument("--notes", type=Path, metavar="MD", help="markdown added to the model card (kept in the run)")
    add_engine_argument(parser)


def add_engine_argument(parser: argparse.ArgumentParser) -> None:
    """--engine, shared with `medvit evaluate`: the inference engine measured beside eager fp32."""
    parser.add_argument(
        "--engine",
        default="auto",
        metavar="NAME",
        help="inference engine whose results are reported beside fp32: auto = the one `medvit predict` and the app "
        "serve on this machine ($MEDVIT_BACKEND wins), or a backend name such as torch or onnx-int8 (default: auto)",
    )


def run(args: argparse.Namespace) -> int:
    from medvit.rundir import check_data_root, check_run_dir

    check_run_dir(args.run)  # before the heavy imports: a typo answers at once
    check_data_root(args.data_root)
    from medvit.evaluate.pipeline import calibrate_run

    result = calibrate_run(
        args.run, labels_csv=args.labels, images_dir=args.images, split=args.split, method=args.method,
        threshold_rule=args.threshold, target_sensitivity=args.target_sensitivity, batch_size=args.batch_size,
        n_boot=args.n_boot, notes=args.notes, engine=args.engine, data_root=args.data_root,
    )
    print(json.dumps(result.summary(), indent=2))
    return 0
