"""A simulated site for the review-loop tests: the packaged demo model (small, trained on the dev train split,
calibrated on its val split) copied into a temp run folder, and timed reviews made from real dev labels."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from medvit.findings import DEFAULT_FINDINGS
from medvit.inference.predictor import Predictor
from medvit.resources import DEMO_RUN
from medvit.review.imports import import_reviews
from medvit.review.store import ReviewStore

START = pd.Timestamp("2024-01-01T08:00:00Z")


def copy_demo_run(dest: Path) -> Path:
    """A writable copy of the demo run (its calibration.json is version v1)."""
    shutil.copytree(DEMO_RUN, dest)
    return dest


def dev_frame(dev_data: Path) -> pd.DataFrame:
    df = pd.read_csv(dev_data / "labels.csv")
    df["labels"] = df["Finding Labels"].str.split("|")
    return df


def enriched_site(dev_data: Path, finding: str = "Effusion", seed: int = 0) -> pd.DataFrame:
    """Every dev image with `finding` plus as many without, shuffled: prevalence 50% (the demo's calib split: 18%)."""
    df = dev_frame(dev_data)
    has = df["labels"].apply(lambda labels: finding in labels)
    site = pd.concat([df[has], df[~has].sample(int(has.sum()), random_state=seed)])
    return site.sample(frac=1, random_state=seed + 1).reset_index(drop=True)


def reviews_csv(
    site: pd.DataFrame,
    path: Path,
    *,
    start: pd.Timestamp = START,
    hours: int = 12,
    findings: tuple[str, ...] = DEFAULT_FINDINGS,
    flip: frozenset[str] = frozenset(),
) -> Path:
    """One review per image, `hours` apart, three reviewers in turn, labels from the NIH labels (those of `flip`
    reversed: reviewers who disagree with the dataset)."""
    rows = []
    for i, r in site.iterrows():
        at = (start + pd.Timedelta(hours=hours * int(i))).isoformat()
        for f in findings:
            present = (f in r["labels"]) != (f in flip)
            rows.append(
                {
                    "image": r["Image Index"],
                    "finding": f,
                    "present": int(present),
                    "reviewer": f"dr{i % 3}",
                    "reviewed_at": at,
                }
            )
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def import_csv(csv: Path, dev_data: Path, run: Path, url: str) -> None:
    store = ReviewStore(url)
    try:
        import_reviews(csv, dev_data / "images", Predictor.from_dir(run, backend="torch"), store)
    finally:
        store.close()
