"""`medvit train -c CONFIG [--set key=value ...] [--out DIR] [--resume RUN_DIR] [--folds K]`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

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
                        help="patient-wise K-fold cross-validation on all labelled rows: one run per fold under "
                        "--out, out-of-fold logits (oof.csv) and CV mean AUROC +- sd beside the pixel baseline (cv.json)")


def run(args: argparse.Namespace) -> int:
    from medvit.config import resolve_config

    cfg = resolve_config(args.config, args.overrides, args.resume)  # before torch: a bad config answers at once
    if args.folds is not None:
        return _cross_validate(cfg, args)
    from medvit._io import read_json
    from medvit.runs import SUMMARY
    from medvit.train.supervised import fit

    run_dir = fit(cfg, out_dir=args.out, resume=args.resume, stop_after=args.stop_after)
    if (run_dir / SUMMARY).is_file():  # not on the non-zero ranks of torchrun
        print(json.dumps({"run_dir": str(run_dir), **read_json(run_dir / SUMMARY)}, indent=2))
    return 0


def _cross_validate(cfg: Config, args: argparse.Namespace) -> int:
    from medvit.errors import ConfigError
    from medvit.train.crossval import cross_validate

    if args.resume is not None or args.stop_after is not None:
        raise ConfigError("--folds resumes by itself (finished folds are skipped): run it again with the same --out")
    summary = cross_validate(cfg, args.out or cfg.out_dir, args.folds)
    keys = ("folds", "n_images", "fold_mean_auroc", "cv_mean_auroc", "cv_sd_auroc", "pooled_oof_mean_auroc",
            "baseline_pixels", "cv_mean_auroc_minus_baseline")
    print(json.dumps({"cv_dir": str(args.out or cfg.out_dir), **{k: summary[k] for k in keys if k in summary}},
                     indent=2))
    return 0
