"""`medvit zeroshot-eval --model SPEC --labels CSV --images DIR --out DIR [--split val]`: zero-shot AUROC per finding.

Pair mode with the default templates; the evaluation itself is `medvit.zeroshot.evaluate.evaluate_zeroshot`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medvit.commands.zeroshot import add_model_arguments
from medvit.findings import ALL_FINDINGS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--labels", required=True, help="labels CSV (NIH Data_Entry or wide format)")
    parser.add_argument("--images", required=True, help="folder the CSV's image paths are relative to")
    parser.add_argument("--out", required=True, help="output folder for metrics.json, predictions.csv, roc.png")
    parser.add_argument("--split", default=None, help="evaluate only this split (e.g. val); default: all rows")
    parser.add_argument("--findings", nargs="+", default=list(ALL_FINDINGS), help="findings to evaluate")
    parser.add_argument("--fit-split", default=None,
                        help="fit one temperature per pair on this split (e.g. train) and save temperatures.json")
    parser.add_argument("--temperatures", default=None, help="temperatures.json fitted earlier for this model")
    parser.add_argument("--n-boot", type=int, default=200, help="patient bootstrap resamples for CIs (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the bootstrap and any --random-init weights")
    parser.add_argument("--no-plots", action="store_true", help="skip roc.png and reliability plots")


def run(args: argparse.Namespace) -> int:
    from medvit.runs import METRICS
    from medvit.zeroshot.evaluate import calibration_label, evaluate_zeroshot
    from medvit.zeroshot.scorer import ZeroShotScorer

    scorer = ZeroShotScorer.load(args.model, prompts=args.prompts, offline=args.offline, dtype=args.dtype,
                                 normalization=args.normalization, temperatures=args.temperatures,
                                 allow_random_init=args.random_init, seed=args.seed)
    report = evaluate_zeroshot(scorer, args.labels, args.images, args.out, findings=args.findings, split=args.split,
                               fit_split=args.fit_split, n_boot=args.n_boot, seed=args.seed,
                               plots=not args.no_plots)
    zs = report["zeroshot"]
    print(f"zero-shot {zs['model']} on {report['n_images']} images (split={args.split}), {calibration_label(report)}")
    for f, m in report["findings"].items():
        auroc = "n/a" if m["auroc"] is None else f"{m['auroc']:.3f}"
        print(f"  {f:<20} AUROC {auroc:>6}  n_pos {m['n_pos']}")
    print(f"  mean AUROC {report['mean_auroc']:.3f} over {report['n_findings_in_means']} findings; "
          f"wrote {Path(args.out) / METRICS}")
    return 0
