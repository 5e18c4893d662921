"""`medvit data check --labels CSV --images DIR`: what a dataset holds before anyone trains on it."""

from __future__ import annotations

import argparse

from medvit.findings import DEFAULT_FINDINGS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["check"], help="check: counts per split, missing files, patient overlap")
    parser.add_argument("--labels", required=True, help="labels CSV (NIH Data_Entry or wide format)")
    parser.add_argument("--images", required=True, help="folder the CSV's image paths are relative to")
    parser.add_argument("--findings", nargs="+", default=list(DEFAULT_FINDINGS), help="findings to count")
    parser.add_argument("--uncertainty", default="ignore", choices=["ignore", "ones", "zeros"])
    parser.add_argument("--split-file", action="append", default=[], metavar="SPLIT=FILE",
                        help="official split list, e.g. train=train_val_list.txt (repeatable)")
    parser.add_argument("--assign-splits", action="store_true",
                        help="show the seeded patient-wise train/val/calib split medvit would make")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from medvit.data.datasets import assign_splits, finding_counts, load_labels, missing_files, patient_overlap
    from medvit.errors import DatasetError

    split_files = {}
    for item in args.split_file:
        split, sep, path = item.partition("=")
        if not sep:
            raise DatasetError(f"--split-file must look like SPLIT=FILE, got {item!r}")
        split_files[split] = path
    df = load_labels(args.labels, args.images, args.findings, uncertainty=args.uncertainty,
                     split_files=split_files or None, check_files=False)
    if args.assign_splits:
        df = assign_splits(df, seed=args.seed, respect_existing=False)

    print(f"{len(df)} images, {df['patient_id'].nunique()} patients")
    splits = df["split"].fillna("unsplit")
    for split, g in df.groupby(splits):
        print(f"  {split}: {len(g)} images, {g['patient_id'].nunique()} patients")
    counts = finding_counts(df, args.findings)
    table = counts.pivot(index="finding", columns="split", values="pos").reindex(counts["finding"].unique())
    print("\npositives per finding and split:")
    print(table.to_string())
    if counts["unknown"].any():
        print("\nunknown (NaN) labels per finding and split:")
        print(counts.pivot(index="finding", columns="split", values="unknown").to_string())

    missing = missing_files(df)
    print(f"\nmissing image files: {len(missing)}" + (f" (first: {', '.join(missing[:5])})" if missing else ""))
    overlap = patient_overlap(df)
    print("patient overlap between splits: " + ("none" if not overlap else ""))
    for (a, b), patients in overlap.items():
        print(f"  {a} & {b}: {len(patients)} patients, e.g. {', '.join(patients[:5])}")
    return 1 if missing or overlap else 0
