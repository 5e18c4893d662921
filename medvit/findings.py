"""Canonical finding names and the mapping of other datasets' labels onto them.

One list is used everywhere (model head, datasets, calibration, app, prompts), as in
TorchXRayVision: each dataset is relabelled onto it, with NaN where a dataset says nothing,
so the loss can be masked instead of treating "not labelled" as "absent".
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from medvit.errors import DatasetError

# The 14 ChestX-ray14 labels, in NIH spelling and order.
NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
DEFAULT_FINDINGS: tuple[str, ...] = NIH_FINDINGS
ALL_FINDINGS: tuple[str, ...] = NIH_FINDINGS + (NO_FINDING,)

# Other datasets' spellings -> canonical name. Keys are normalised with `_key`.
_ALIASES: dict[str, str] = {
    "pleural effusion": "Effusion",
    "effusions": "Effusion",
    "pleural thickening": "Pleural_Thickening",
    "infiltrate": "Infiltration",
    "infiltrates": "Infiltration",
    "enlarged heart": "Cardiomegaly",
    "lung lesion": "Nodule",  # CheXpert's "Lung Lesion" covers nodules and masses; nodule is the closer NIH label
    "no findings": NO_FINDING,
    "normal": NO_FINDING,
}

# CheXpert findings with no NIH counterpart: they are known, but not part of the default head.
CHEXPERT_ONLY: tuple[str, ...] = (
    "Enlarged Cardiomediastinum",
    "Lung Opacity",
    "Fracture",
    "Support Devices",
    "Pleural Other",
)


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


_CANONICAL: dict[str, str] = {_key(n): n for n in ALL_FINDINGS + CHEXPERT_ONLY}
_CANONICAL.update(_ALIASES)


def canonical(name: str) -> str:
    """The canonical spelling of a finding name from any supported dataset.

    Raises:
        DatasetError: the name is not a known finding (the message lists the known ones).
    """
    try:
        return _CANONICAL[_key(name)]
    except KeyError:
        raise DatasetError(
            f"unknown finding {name!r}; known findings: {', '.join(ALL_FINDINGS + CHEXPERT_ONLY)}"
        ) from None


def close_finding(name: str) -> str | None:
    """The known finding a column name looks like a misspelling of ("Efusion" -> "Effusion"), else None."""
    if is_finding(name):
        return None
    close = difflib.get_close_matches(_key(name), list(_CANONICAL), n=1, cutoff=0.8)
    return _CANONICAL[close[0]] if close else None


def display_name(name: str) -> str:
    """How a finding is written for people (reports, SR code meanings): "Pleural_Thickening" -> "Pleural Thickening"."""
    return name.replace("_", " ")


def is_finding(name: str) -> bool:
    """Whether `name` (any spelling) is a known finding."""
    return _key(name) in _CANONICAL


def resolve_findings(names: Iterable[str]) -> tuple[str, ...]:
    """Canonicalise a configured finding list, rejecting unknown names and duplicates."""
    out = tuple(canonical(n) for n in names)
    dupes = sorted({n for n in out if out.count(n) > 1})
    if dupes:
        raise DatasetError(f"findings listed more than once: {', '.join(dupes)}")
    if not out:
        raise DatasetError("the findings list is empty")
    return out


def parse_nih_labels(labels: str | float) -> set[str]:
    """Split an NIH `Finding Labels` cell ("Effusion|Mass") into canonical names."""
    if not isinstance(labels, str) or not labels.strip():
        raise DatasetError(f"empty 'Finding Labels' cell: {labels!r} (NIH uses 'No Finding' for normal images)")
    return {canonical(p) for p in labels.split("|") if p.strip()}


def numeric_labels(col: pd.Series) -> np.ndarray:
    """A wide-format label column as floats; blank is unknown, text such as "yes" is an error, not NaN."""
    values = pd.to_numeric(col, errors="coerce")
    candidates = col[values.isna() & col.notna()]  # only these can be text: stringify them, not the whole column
    text = candidates[candidates.astype(str).str.strip() != ""]
    if len(text):
        raise DatasetError(
            f"column {col.name!r} holds non-numeric labels such as {text.iloc[0]!r}; use 1, 0, -1 or blank"
        )
    return values.to_numpy(dtype=np.float32)


def align_labels(df: pd.DataFrame, findings: Sequence[str] = DEFAULT_FINDINGS) -> np.ndarray:
    """Map a dataset's labels onto `findings`: an (N, K) float32 array of 1, 0 or NaN (unknown).

    Two source formats are understood:
      * NIH Data_Entry: a `Finding Labels` column ("A|B" or "No Finding"). NIH labels every finding
        for every image, so a finding not listed is a 0.
      * wide: one column per finding (any alias spelling) holding 1/0/NaN. A requested finding with
        no column is unknown (NaN) for the whole dataset; "No Finding" is derived when absent.
    """
    findings = resolve_findings(findings)
    n = len(df)
    out = np.full((n, len(findings)), np.nan, dtype=np.float32)
    if "Finding Labels" in df.columns:
        parsed = [parse_nih_labels(v) for v in df["Finding Labels"]]
        for j, f in enumerate(findings):
            out[:, j] = [1.0 if f in p else 0.0 for p in parsed]
        return out

    columns = {canonical(c): c for c in df.columns if is_finding(c)}
    if not columns:
        raise DatasetError(
            "labels have neither a 'Finding Labels' column (NIH format) nor any finding columns (wide format); "
            f"columns found: {', '.join(map(str, df.columns))}"
        )
    for j, f in enumerate(findings):
        if f in columns:
            out[:, j] = numeric_labels(df[columns[f]])
    if NO_FINDING in findings and NO_FINDING not in columns:
        j = findings.index(NO_FINDING)
        others = out[:, [i for i, f in enumerate(findings) if f != NO_FINDING]]
        any_pos = np.nan_to_num(others, nan=0.0).max(axis=1, initial=0.0) > 0
        all_known_neg = ~np.isnan(others).any(axis=1) & ~any_pos
        out[:, j] = np.where(any_pos, 0.0, np.where(all_known_neg, 1.0, np.nan))
    bad = ~np.isin(out[~np.isnan(out)], (0.0, 1.0))
    if bad.any():
        raise DatasetError("finding columns must hold 1, 0 or blank after the uncertainty policy is applied")
    return out
