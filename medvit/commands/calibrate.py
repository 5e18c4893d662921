"""`medvit calibrate --run RUN_DIR [--method ...] [--threshold ...] [--labels CSV --images DIR]`.

Fits per-finding calibrators and thresholds on the run's patient-disjoint calib split (its val split when it
has none), writes calibration.json, metrics.json (cross-validated on that split, with the served inference engine
beside fp32) and the README.md model card; see `medvit.evaluate.pipeline.calibrate_run`. It also fits the
out-of-distribution statistics on the run's training split (`--ood-only`: only those; `medvit.evaluate.ood`).

`--from-reviews [--db URL] [--no-activate]` refits on the site's labelled reviews into a new calibration version,
`--versions` lists the versions and `--activate VERSION` rolls back or forward (`medvit.review.recalibrate`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medvit.evaluate.calibration import METHODS, THRESHOLD_RULES
from medvit.evaluate.site import MIN_REVIEWS, PRIOR_STRENGTH


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
    parser.add_argument("--ood-only", action="store_true",
                        help="only (re)fit the out-of-distribution statistics on the run's training split (ood file)")
    add_engine_argument(parser)
    add_version_arguments(parser)


def add_version_arguments(parser: argparse.ArgumentParser) -> None:
    """Site recalibration from reviews and the run's calibration versions (medvit.review.recalibrate)."""
    group = parser.add_argument_group("calibration versions and site recalibration")
    action = group.add_mutually_exclusive_group()
    action.add_argument("--from-reviews", action="store_true",
                        help="refit on the review database's labelled reviews of this run's weights: a new version")
    action.add_argument("--versions", action="store_true", help="list the run's calibration versions")
    action.add_argument("--activate", metavar="VERSION", help="make VERSION (e.g. v1) the active calibration")
    group.add_argument("--db", metavar="URL", help="review database (default: $MEDVIT_DB_URL, else the local SQLite)")
    group.add_argument("--no-activate", action="store_true", help="with --from-reviews: write the version only")
    group.add_argument("--finding", action="append", default=[], metavar="NAME",
                       help="with --from-reviews: recalibrate only this finding (repeatable; default: every finding "
                       "with enough reviews, the others keep their calibration)")
    group.add_argument("--prior-strength", type=float, default=PRIOR_STRENGTH, metavar="K",
                       help="pseudo-reviews of the current calibration the fit is shrunk toward (default: %(default)g)")
    group.add_argument("--min-reviews", type=int, default=MIN_REVIEWS, metavar="M",
                       help="labelled reviews a finding needs to be recalibrated (default: %(default)d)")


def add_engine_argument(parser: argparse.ArgumentParser) -> None:
    """--engine, shared with `medvit evaluate`: the inference engine measured beside eager fp32."""
    parser.add_argument(
        "--engine",
        default="auto",
        metavar="NAME",
        help="inference engine whose results are reported beside fp32: auto = the one `medvit predict` and the app "
        "serve on this machine ($MEDVIT_BACKEND wins), or a backend name such as torch or onnx-int8 (default: auto)",
    )


def _run_versions(args: argparse.Namespace) -> int:
    if args.versions:
        from medvit.evaluate.versions import list_versions

        for version in list_versions(args.run):
            print(json.dumps(version.summary()))
        return 0
    from medvit.review.recalibrate import activate, cli_actor, recalibrate_from_reviews
    from medvit.review.store import ReviewStore

    store = ReviewStore(args.db)
    try:
        if args.activate:
            previous = activate(args.run, args.activate, store, actor=cli_actor())
            print(json.dumps({"active": args.activate, "previous": previous}))
            return 0
        result = recalibrate_from_reviews(
            args.run, store, actor=cli_actor(), findings=args.finding, activate=not args.no_activate,
            prior_strength=args.prior_strength, min_reviews=args.min_reviews,
        )
        print(json.dumps(result.summary(), indent=2))
        return 0
    finally:
        store.close()


def run(args: argparse.Namespace) -> int:
    if args.from_reviews or args.versions or args.activate:
        return _run_versions(args)
    from medvit.rundir import check_data_root, check_run_dir

    check_run_dir(args.run)  # before the heavy imports: a typo answers at once
    check_data_root(args.data_root)
    from medvit.evaluate.pipeline import calibrate_run, refit_ood

    if args.ood_only:
        from medvit.errors import DatasetError
        from medvit.runs import load_run

        stats = refit_ood(*load_run(args.run, data_root=args.data_root), batch_size=args.batch_size)
        if stats is None:
            raise DatasetError(f"{args.run}: no out-of-distribution statistics could be fitted (see the warning)")
        print(json.dumps({"ood_threshold": round(stats.threshold, 3), "quantile": stats.quantile,
                          "n_images": stats.n_images}))
        return 0
    result = calibrate_run(
        args.run, labels_csv=args.labels, images_dir=args.images, split=args.split, method=args.method,
        threshold_rule=args.threshold, target_sensitivity=args.target_sensitivity, batch_size=args.batch_size,
        n_boot=args.n_boot, notes=args.notes, engine=args.engine, data_root=args.data_root,
    )
    print(json.dumps(result.summary(), indent=2))
    return 0
