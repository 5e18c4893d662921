"""`medvit train -c CONFIG [--set key=value ...] [--out DIR] [--resume RUN_DIR] [--folds K]`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from medvit.errors import ConfigError

if TYPE_CHECKING:
    from medvit.config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, help="YAML config (optional with --resume: the run's own)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    parser.add_argument("--out", type=Path, help="run folder (default: out_dir from the config)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue this run exactly where it stopped")
    parser.add_argument("--stop-after", type=int, metavar="N",
                        help="end this session after N epochs; the run stays resumable")
    parser.add_argument("--folds", type=int, metavar="K",
                        help="patient-wise K-fold cross-validation on all labelled rows: one run per fold under --out, "
                        "out-of-fold logits (oof.csv), CV mean AUROC +- sd beside the pixel baseline (cv.json)")
    parser.add_argument("--ensemble", action="store_true",
                        help="with --folds: make --out one run serving the mean of the fold models, calibrated on "
                        "their out-of-fold logits (calibration.json, metrics.json, model card)")
    parser.add_argument("--notes", type=Path, metavar="MD", help="with --ensemble: markdown for the model card")


def run(args: argparse.Namespace) -> int:
    from medvit.config import resolve_config

    cfg = resolve_config(args.config, args.overrides, args.resume)  # before torch: a bad config answers at once
    if args.folds is not None:
        return _cross_validate(cfg, args)
    if args.ensemble or args.notes is not None:
        raise ConfigError("--ensemble and --notes go with --folds K")
    from medvit._io import read_json
    from medvit.runs import SUMMARY
    from medvit.train.supervised import fit

    run_dir = fit(cfg, out_dir=args.out, resume=args.resume, stop_after=args.stop_after)
    if (run_dir / SUMMARY).is_file():  # not on the non-zero ranks of torchrun
        print(json.dumps({"run_dir": str(run_dir), **read_json(run_dir / SUMMARY)}, indent=2))
    return 0


def _cross_validate(cfg: Config, args: argparse.Namespace) -> int:
    from medvit.train.crossval import cross_validate

    if args.resume is not None or args.stop_after is not None:
        raise ConfigError("--folds resumes by itself (finished folds are skipped): run it again with the same --out")
    if args.notes is not None and not args.notes.is_file():
        raise ConfigError(f"--notes {args.notes}: file not found")
    out = args.out or cfg.out_dir
    result = cross_validate(cfg, out, args.folds)
    summary = result.summary
    keys = ("folds", "n_images", "fold_mean_auroc", "cv_mean_auroc", "cv_sd_auroc", "pooled_oof_mean_auroc",
            "baseline_pixels", "cv_mean_auroc_minus_baseline")
    printed = {"cv_dir": str(out), **{k: summary[k] for k in keys if k in summary}}
    if args.ensemble:
        from medvit.evaluate.oof import calibrate_out_of_fold
        from medvit.train.crossval import build_fold_ensemble

        build_fold_ensemble(cfg, out, args.folds)
        oof = result.oof
        report = calibrate_out_of_fold(out, oof.frame, oof.logits, oof.labels, notes=args.notes)
        printed["ensemble"] = {"run_dir": str(out), "mean_ece_out_of_fold": report["mean_ece"],
                               "calibration": report["calibration"]["chosen"], "served_engine": report["served_engine"]}
    print(json.dumps(printed, indent=2))
    return 0
