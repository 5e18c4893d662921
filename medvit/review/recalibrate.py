"""`medvit calibrate --from-reviews` and `--activate` behind the command: reviews in, a calibration version out,
and every change of a run's calibration in the audit trail.

The fitting is `medvit.evaluate.site`; the versions are `medvit.evaluate.versions`; the reviews are those of the
run's own weights (`medvit.review.labelled`), since another model's raw outputs say nothing about this one.
"""

from __future__ import annotations

import getpass
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from medvit._io import read_json, sha256_file
from medvit.errors import CheckpointError, ConfigError
from medvit.evaluate import site
from medvit.evaluate.versions import activate_version, load_active, save_version
from medvit.findings import canonical
from medvit.review.audit import record
from medvit.review.labelled import labelled_reviews
from medvit.review.store import ReviewStore
from medvit.rundir import CONFIG
from medvit.runs import WEIGHTS

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recalibration:
    """What `recalibrate_from_reviews` wrote: the version's name, whether it is active, and its metadata."""

    version: str
    active: bool
    meta: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """The JSON `medvit calibrate --from-reviews` prints."""
        return {"version": self.version, "active": self.active, "parent": self.meta["parent"],
                "reviews": self.meta["reviews"], "evaluation": self.meta["evaluation"]}  # fmt: skip


def cli_actor() -> str:
    """Who ran a command, for the audit trail and a version's metadata: "cli:<operating-system login>"."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name in this environment (some containers)
        return "cli"


def run_identity(run_dir: Path) -> tuple[tuple[str, ...], str]:
    """The run's findings and weights hash, read without building the model."""
    if not (run_dir / CONFIG).is_file() or not (run_dir / WEIGHTS).is_file():
        raise CheckpointError(f"{run_dir} is not a run folder (it needs {CONFIG} and {WEIGHTS})")
    return tuple(read_json(run_dir / CONFIG)["findings"]), sha256_file(run_dir / WEIGHTS)


def _review_summary(reviews: pd.DataFrame, used: Sequence[str]) -> dict[str, Any]:
    """Counts per finding, the date range and the number of reviewers of the reviews a version learnt from."""
    data = site.usable(reviews[reviews["finding"].isin(used)])
    per = {
        f: {"n_labelled": len(g), "n_present": int((g["label"] == 1).sum()), "n_absent": int((g["label"] == 0).sum())}
        for f, g in data.groupby("finding", sort=True)
    }
    return {
        "n_labelled": len(data),
        "n_reviews": int(data["review_id"].nunique()),
        "per_finding": per,
        "from": data["created_at"].min().isoformat() if len(data) else None,
        "to": data["created_at"].max().isoformat() if len(data) else None,
        "n_reviewers": int(data["reviewer"].nunique()),
        "sources": sorted(data["source"].dropna().unique().tolist()),
    }


def recalibrate_from_reviews(
    run_dir: str | os.PathLike,
    store: ReviewStore,
    *,
    actor: str,
    findings: Sequence[str] = (),
    activate: bool = True,
    prior_strength: float = site.PRIOR_STRENGTH,
    min_reviews: int = site.MIN_REVIEWS,
    test_fraction: float = site.TEST_FRACTION,
) -> Recalibration:
    """Fit a site calibration on the reviews of the run's weights, store it as a new version (active unless
    `activate` is False) and audit the change.

    Raises:
        DatasetError: too few labelled reviews ("N labelled reviews of FINDING, at least M needed").
        ConfigError: a finding that the run does not predict. CheckpointError: not a run folder.
    """
    run_dir = Path(run_dir)
    run_findings, weights = run_identity(run_dir)
    wanted = [canonical(f) for f in findings]
    unknown = [f for f in wanted if f not in run_findings]
    if unknown:
        raise ConfigError(f"--finding {unknown[0]}: the run predicts {', '.join(run_findings)}")
    parent, current = load_active(run_dir, run_findings)
    reviews = labelled_reviews(store.engine, weights)
    fit = site.fit_site_calibration(current, reviews, findings=wanted, prior_strength=prior_strength,
                                    min_reviews=min_reviews, test_fraction=test_fraction)  # fmt: skip
    recalibrated = fit.report["findings"]
    summary = _review_summary(reviews, list(recalibrated))
    meta: dict[str, Any] = {
        "source": "site reviews",
        "weights_sha256": weights,
        "database": store.display_url,
        "reviews": summary,
        "method": {"calibrator": "platt shrunk toward the parent", "prior_strength": prior_strength,
                   "test_fraction": test_fraction, "min_reviews": min_reviews},
        "evaluation": fit.report,
    }  # fmt: skip
    name = save_version(run_dir, fit.calibration, meta, activate=activate, created_by=actor)
    detail = {"run": str(run_dir), "version": name, "parent": parent, "activated": activate,
              "findings": list(recalibrated), "mean": fit.report["mean"]}  # fmt: skip
    record(store.engine, actor, "calibration_change", target=f"{run_dir.name}:{name}", detail=detail)
    _log.info(
        "calibration %s of %s from %d labelled reviews%s",
        name,
        run_dir,
        summary["n_labelled"],
        " (active)" if activate else "",
    )
    return Recalibration(name, activate, {**meta, "parent": None if parent == "none" else parent})


def activate(run_dir: str | os.PathLike, version: str, store: ReviewStore, *, actor: str) -> str:
    """Make `version` the run's active calibration (roll back or forward), audited; returns the previous one."""
    run_dir = Path(run_dir)
    previous = activate_version(run_dir, version)
    record(store.engine, actor, "calibration_change", target=f"{run_dir.name}:{version}",
           detail={"run": str(run_dir), "activated": version, "previous": previous})  # fmt: skip
    return previous
