"""`medvit zeroshot-eval --model SPEC --labels CSV --images DIR --out DIR [--split val]`: zero-shot AUROC per finding.

Pair mode with the default templates. metrics.json is built by `medvit.evaluate.build_report` from the pair logits
z = logit_scale * (s_pos - s_neg) (so sigmoid(z) is the uncalibrated pair probability), hence it has exactly the
finding-level keys of `medvit evaluate`, plus a `zeroshot` block naming the model, prompts and calibration status.
"""

from __future__ import annotations

import argparse

from medvit.commands.zeroshot import add_model_arguments, prepare_offline
from medvit.findings import ALL_FINDINGS

_CHUNK = 64  # images decoded and encoded at a time


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
    prepare_offline(args)
    from pathlib import Path

    import numpy as np
    from tqdm import tqdm

    from medvit.data.datasets import label_matrix, load_labels
    from medvit.data.dicom import read_image
    from medvit.errors import DatasetError
    from medvit.evaluate.calibration import Calibration, Temperature
    from medvit.evaluate.report import build_report, plot_curves, write_metrics
    from medvit.findings import resolve_findings
    from medvit.runs import METRICS
    from medvit.zeroshot.scorer import CALIBRATED, UNCALIBRATED, ZeroShotScorer

    findings = resolve_findings(args.findings)
    df = load_labels(args.labels, args.images, findings)
    scorer = ZeroShotScorer.load(args.model, prompts=args.prompts, offline=args.offline, dtype=args.dtype,
                                 normalization=args.normalization, temperatures=args.temperatures,
                                 allow_random_init=args.random_init, seed=args.seed)
    pairs = scorer.finding_pairs(findings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def similarities(split: str | None):
        """(frame, s_pos, s_neg) of a split; images are decoded in chunks so large sets fit in memory."""
        part = (df if split is None else df[df["split"] == split]).reset_index(drop=True)
        if part.empty:
            raise DatasetError(f"no images in split {split!r} of {args.labels}")
        paths = list(part["path"])
        chunks = [scorer.pair_similarities([read_image(p) for p in paths[s:s + _CHUNK]], pairs)
                  for s in tqdm(range(0, len(paths), _CHUNK), desc=f"zero-shot {split or 'all'}", leave=False)]
        return part, np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])

    if args.fit_split:
        fit_df, fit_pos, fit_neg = similarities(args.fit_split)
        scorer.fit_temperatures(pairs, fit_pos, fit_neg, label_matrix(fit_df, findings))
        scorer.save_temperatures(out / "temperatures.json")

    eval_df, s_pos, s_neg = similarities(args.split)
    scale = scorer.logit_scale
    logits = scale * (s_pos - s_neg)
    labels = label_matrix(eval_df, findings)
    status = {f: scorer.temperature(f)[1] for f in findings}
    if any(s == CALIBRATED for s in status.values()):
        # temperatures relative to the model scale: sigmoid(z / (T * scale)) == softmax([s_pos, s_neg] / T)[0]
        cals = tuple(Temperature(scorer.temperature(f)[0] * scale) for f in findings)
        calibration = Calibration(findings, cals, np.full(len(findings), 0.5), "temperature",
                                  {"chosen": "per-pair temperature (zero-shot)"})
    else:
        calibration = Calibration.identity(findings)

    report = build_report(logits, labels, findings, eval_df["patient_id"].to_numpy(), calibration,
                          n_boot=args.n_boot, seed=args.seed)
    report["zeroshot"] = {
        "model": scorer.backend.model_id,
        "mode": "pair",
        "split": args.split,
        "normalization": args.normalization,
        "logit_scale": scale,
        "calibration": dict(status),
        "temperatures": {f: scorer.temperature(f)[0] for f in findings},
        "prompts": {p.name: {"positive": list(p.positive), "negative": list(p.negative)} for p in pairs},
    }
    write_metrics(report, out / METRICS)
    probs = calibration.apply(logits)
    pred = eval_df[["image_id", "patient_id"]].copy()
    for k, f in enumerate(findings):
        pred[f] = probs[:, k]
    pred.to_csv(out / "predictions.csv", index=False)
    if not args.no_plots:
        plot_curves(out, logits, labels, findings, calibration)

    label = "uncalibrated" if all(s == UNCALIBRATED for s in status.values()) else "per-pair temperatures"
    print(f"zero-shot {scorer.backend.model_id} on {len(eval_df)} images (split={args.split}), {label}")
    for f in findings:
        m = report["findings"].get(f)
        if m is not None:
            auroc = "n/a" if m["auroc"] is None else f"{m['auroc']:.3f}"
            print(f"  {f:<20} AUROC {auroc:>6}  n_pos {m['n_pos']}")
    print(f"  mean AUROC {report['mean_auroc']:.3f} over {report['n_findings_in_means']} findings; "
          f"wrote {out / 'metrics.json'}")
    return 0
