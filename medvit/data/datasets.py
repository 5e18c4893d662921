"""Labelled CSV datasets (NIH Data_Entry and CheXpert-style wide CSVs) and patient-wise splits.

Every loader returns the same frame: `image_id`, `path` (absolute), `patient_id`, `view`, `split`,
then one float column per finding (1, 0 or NaN). Everything downstream (training, calibration,
evaluation, `medvit data check`) works on that frame only.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medvit.data.dicom import read_image
from medvit.errors import DatasetError
from medvit.findings import (
    DEFAULT_FINDINGS,
    align_labels,
    close_finding,
    is_finding,
    numeric_labels,
    resolve_findings,
)

_log = logging.getLogger(__name__)

SPLITS = ("train", "val", "calib", "test")
UNCERTAINTY_POLICIES = ("ignore", "ones", "zeros")
_NIH_REQUIRED = ("Image Index", "Finding Labels", "Patient ID")
WIDE_PATH_COLUMNS = ("Path", "path", "image", "Image", "filename")
_CHEXPERT_PATIENT = re.compile(r"(patient\d+)")


def _read_csv(csv: str | os.PathLike) -> pd.DataFrame:
    path = Path(csv)
    if not path.is_file():
        raise DatasetError(f"labels CSV not found: {path}")
    try:
        df = pd.read_csv(path, dtype={"Patient ID": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is not a readable CSV: {e}") from None
    if df.empty:
        raise DatasetError(f"{path} has no rows")
    return df


def safe_path(root: Path, rel: str) -> str:
    """Resolve `rel` under `root`, refusing absolute paths and `..` escapes (a CSV must not reach outside)."""
    if not isinstance(rel, str) or not rel.strip():
        raise DatasetError(f"empty image path in the labels CSV under {root}")
    if "\x00" in rel:
        raise DatasetError(f"image path {rel!r} in the labels CSV contains a NUL byte")
    full = (root / rel).resolve()
    if not full.is_relative_to(root):
        raise DatasetError(f"image path {rel!r} escapes the image root {root}; paths must stay inside it")
    return str(full)


def _from_nih(df: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in _NIH_REQUIRED if c not in df.columns]
    if missing:
        raise DatasetError(f"NIH-format labels CSV lacks column(s) {', '.join(missing)}")
    return pd.DataFrame(
        {
            "image_id": df["Image Index"].astype(str),
            "rel_path": df["Image Index"].astype(str),
            "patient_id": df["Patient ID"].astype(str),
            "view": df["View Position"].astype(str) if "View Position" in df.columns else None,
        }
    )


def _from_wide(df: pd.DataFrame, uncertainty: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    path_col = next((c for c in WIDE_PATH_COLUMNS if c in df.columns), None)
    if path_col is None:
        raise DatasetError(
            "labels CSV is neither NIH format (needs 'Image Index', 'Finding Labels', 'Patient ID') "
            f"nor wide format (needs a path column: one of {', '.join(WIDE_PATH_COLUMNS)}); "
            f"columns found: {', '.join(map(str, df.columns))}"
        )
    paths = df[path_col].astype(str)
    if "Patient ID" in df.columns:
        patients = df["Patient ID"].astype(str)
    else:  # CheXpert encodes the patient in the path: train/patient00001/study1/view1_frontal.jpg
        found = paths.str.extract(_CHEXPERT_PATIENT, expand=False)
        if found.isna().any():
            raise DatasetError("wide-format CSV needs a 'Patient ID' column (or CheXpert-style 'patientNNNNN' paths)")
        patients = found
    view = next((df[c].astype(str) for c in ("View Position", "AP/PA", "Frontal/Lateral") if c in df.columns), None)
    _refuse_misspelled_findings(df.columns)
    labels = pd.DataFrame({c: numeric_labels(df[c]) for c in df.columns if is_finding(c)}, index=df.index)
    policy = {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}[uncertainty]
    labels = labels.mask(labels == -1, policy)
    frame = pd.DataFrame({"image_id": paths, "rel_path": paths, "patient_id": patients, "view": view})
    return frame, labels


def _refuse_misspelled_findings(columns: Sequence[object]) -> None:
    """A column that looks like a finding but is not one would be silently ignored (that finding all unknown)."""
    for column in map(str, columns):
        near = close_finding(column)
        if near is not None:
            raise DatasetError(f"column {column!r} is not a known finding; did you mean {near!r}? "
                               "(rename the column; unknown columns are otherwise ignored)")


def _read_split_list(path: str | os.PathLike) -> set[str]:
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"split file not found: {p}")
    return {line.strip() for line in p.read_text().splitlines() if line.strip()}


def load_labels(
    csv: str | os.PathLike,
    images_root: str | os.PathLike,
    findings: Sequence[str] = DEFAULT_FINDINGS,
    *,
    uncertainty: str = "ignore",
    split_files: dict[str, str | os.PathLike] | None = None,
    check_files: bool = True,
) -> pd.DataFrame:
    """Load a labels CSV (NIH Data_Entry or CheXpert-style wide) into medvit's common frame.

    Args:
        csv: the labels file.
        images_root: folder the image paths in the CSV are relative to.
        findings: the findings to align onto (canonical names or aliases).
        uncertainty: wide format only; what a -1 label means: "ignore" (NaN), "ones" or "zeros".
        split_files: optional {"train": "train_val_list.txt", "test": "test_list.txt"} naming images
            per split, as NIH ships them; overrides a `split` column.
        check_files: raise if any image file is missing (one error with the count and first paths).
    """
    if uncertainty not in UNCERTAINTY_POLICIES:
        raise DatasetError(f"uncertainty policy must be one of {UNCERTAINTY_POLICIES}, got {uncertainty!r}")
    findings = resolve_findings(findings)
    root = Path(images_root).resolve()
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    raw = _read_csv(csv)

    if "Finding Labels" in raw.columns or "Image Index" in raw.columns:
        frame = _from_nih(raw)
        labels = align_labels(raw, findings)
    else:
        frame, wide = _from_wide(raw, uncertainty)
        labels = align_labels(wide, findings)

    dupes = frame["image_id"][frame["image_id"].duplicated()].unique()
    if len(dupes):
        raise DatasetError(f"{len(dupes)} duplicate image id(s) in {csv}, e.g. {', '.join(map(str, dupes[:3]))}")

    frame["path"] = [safe_path(root, p) for p in frame.pop("rel_path")]
    frame["split"] = raw["split"].astype(str).str.lower().to_numpy() if "split" in raw.columns else None
    if split_files:
        frame["split"] = None
        for split, listing in split_files.items():
            frame.loc[frame["image_id"].isin(_read_split_list(listing)), "split"] = split
    unknown = set(frame["split"].dropna()) - set(SPLITS)
    if unknown:
        raise DatasetError(f"unknown split name(s) {sorted(unknown)} in {csv}; use {', '.join(SPLITS)}")
    for j, f in enumerate(findings):
        frame[f] = labels[:, j]
    if check_files:
        check_image_files(frame)
    _log.info("loaded %d images of %d patients from %s", len(frame), frame["patient_id"].nunique(), csv)
    return frame


def missing_files(df: pd.DataFrame) -> list[str]:
    """Paths in the frame that do not exist on disk."""
    return [p for p in df["path"] if not os.path.isfile(p)]


def check_image_files(df: pd.DataFrame) -> None:
    """Raise one DatasetError naming how many image files are missing and the first few."""
    missing = missing_files(df)
    if missing:
        shown = ", ".join(missing[:5])
        raise DatasetError(f"{len(missing)} of {len(df)} image files are missing, first: {shown}")


def assign_splits(
    df: pd.DataFrame, *, seed: int = 0, val: float = 0.15, calib: float = 0.15, respect_existing: bool = True
) -> pd.DataFrame:
    """Add a patient-wise, seeded train/val/calib split: no patient ever lands in two splits.

    With `respect_existing`, rows that already have a split keep it and only unsplit patients are
    assigned (a patient already placed keeps all their images in that split).
    """
    if not 0 <= val < 1 or not 0 <= calib < 1 or val + calib >= 1:
        raise DatasetError(f"split fractions must leave room for training: val={val}, calib={calib}")
    out = df.copy()
    if "split" not in out.columns or not respect_existing:
        out["split"] = None
    placed = out.dropna(subset=["split"]).groupby("patient_id")["split"].first()
    todo = np.array(sorted(set(out.loc[out["split"].isna(), "patient_id"]) - set(placed.index)))
    rng = np.random.default_rng(seed)
    rng.shuffle(todo)
    n_val, n_calib = round(len(todo) * val), round(len(todo) * calib)
    assignment = dict(placed)
    assignment.update({p: "val" for p in todo[:n_val]})
    assignment.update({p: "calib" for p in todo[n_val : n_val + n_calib]})
    assignment.update({p: "train" for p in todo[n_val + n_calib :]})
    out["split"] = out["patient_id"].map(assignment)
    return out


def patient_overlap(df: pd.DataFrame) -> dict[tuple[str, str], list[str]]:
    """Patients that appear in more than one split, per pair of splits (empty when the split is clean)."""
    groups = {s: set(g["patient_id"]) for s, g in df.dropna(subset=["split"]).groupby("split")}
    names = sorted(groups)
    return {
        (a, b): sorted(groups[a] & groups[b])
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if groups[a] & groups[b]
    }


def label_matrix(df: pd.DataFrame, findings: Sequence[str]) -> np.ndarray:
    """The (N, K) float32 label array (NaN = unknown) for `findings`, in that order."""
    findings = resolve_findings(findings)
    absent = [f for f in findings if f not in df.columns]
    if absent:
        raise DatasetError(f"labels frame has no column for {', '.join(absent)}")
    return df[list(findings)].to_numpy(dtype=np.float32)


def finding_counts(df: pd.DataFrame, findings: Sequence[str]) -> pd.DataFrame:
    """Positives / negatives / unknown per finding and split, as TorchXRayVision's `totals()`."""
    rows = []
    for split, g in df.groupby(df["split"].fillna("unsplit")):
        y = label_matrix(g, findings)
        for j, f in enumerate(resolve_findings(findings)):
            col = y[:, j]
            rows.append(
                {"split": split, "finding": f, "pos": int((col == 1).sum()), "neg": int((col == 0).sum()),
                 "unknown": int(np.isnan(col).sum())}
            )
    return pd.DataFrame(rows)


class XrayDataset:
    """A torch-style map dataset: (image tensor 3xHxW float32, labels K float32 with NaN).

    Images go through `medvit.data.dicom.read_image`, the one reader shared by training, the app
    and zero-shot. With `cache=True` decoded images are kept in memory, so repeated epochs do not
    pay decoding again (DICOM decoding costs 0.2-1 s per image on CPU). With `seed` set, a random
    transform is reseeded per (seed, epoch, index): augmentation is then the same whatever the
    number of workers or ranks, and a resumed run sees exactly what an uninterrupted one would.
    """

    def __init__(
        self,
        df: pd.DataFrame,
        findings: Sequence[str],
        transform: Callable[[np.ndarray], object],
        *,
        cache: bool = False,
        seed: int | None = None,
    ) -> None:
        self.df = df.reset_index(drop=True)
        self.findings = resolve_findings(findings)
        self.labels = label_matrix(self.df, self.findings)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.df)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentation stream (call before iterating; workers must not be persistent)."""
        self.epoch = epoch

    def pixels(self, i: int) -> np.ndarray:
        """Decoded HxW float32 [0,1] pixels of image `i` (from the cache when enabled)."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        pixels = read_image(self.df.at[i, "path"]).pixels
        if self._cache is not None:
            self._cache[i] = pixels
        return pixels

    def __getitem__(self, i: int):
        import torch

        reseed = getattr(self.transform, "reseed", None)
        if self.seed is not None and reseed is not None:
            reseed((self.seed * 1_000_003 + self.epoch * 100_003 + i) % 2**32)
        return self.transform(self.pixels(i)), torch.from_numpy(self.labels[i].copy())
