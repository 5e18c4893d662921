"""The admin's monitoring page: how the served model is doing against this site's reviewers, per finding.

UI only; the numbers come from `medvit.review.monitoring` over `medvit.review.labelled`. A red banner on top
names every finding whose recent agreement or calibration error is past the bound set from the run's
metrics.json (what the model card reports).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import streamlit as st

from medvit._io import read_json, sha256_file
from medvit.evaluate.versions import active_name, list_versions
from medvit.review.labelled import labelled_reviews
from medvit.review.monitoring import RECENT, FindingMonitor, monitor
from medvit.review.panels import reported
from medvit.review.store import ReviewStore
from medvit.runs import METRICS, WEIGHTS


@st.cache_data(show_spinner=False, max_entries=8)
def _weights_sha256(path: str, mtime_ns: int) -> str:
    return sha256_file(path)


@st.cache_data(show_spinner="Computing the monitoring numbers…", max_entries=4, ttl=300)
def _monitoring(
    _store: ReviewStore, url: str, sha: str, n_reviews: int, card: dict[str, Any] | None
) -> list[FindingMonitor]:
    """Cached per database, weights and review count: a new review recomputes, a rerun does not."""
    return monitor(labelled_reviews(_store.engine, sha), card)


def reliability_figure(mon: FindingMonitor) -> plt.Figure:
    """Observed positive rate against the probability shown, per bin, with the diagonal of perfect calibration."""
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfectly calibrated")
    r = mon.reliability
    if r is not None:
        filled = r.counts > 0
        ax.plot(r.mean_prob[filled], r.frac_pos[filled], "o-", c="C0", label="reviews")
        for x, y, n in zip(r.mean_prob[filled], r.frac_pos[filled], r.counts[filled], strict=True):
            ax.annotate(str(int(n)), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="probability shown",
        ylabel="share labelled present",
        title=f"{mon.finding} (ECE {mon.ece:.3f})" if mon.ece is not None else mon.finding,
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def _versions_table(run_dir: Path) -> pd.DataFrame:
    rows = []
    for v in list_versions(run_dir):
        reviews = v.meta.get("reviews") or {}
        rows.append(
            {
                "version": v.name,
                "active": v.active,
                "parent": v.meta.get("parent"),
                "source": v.meta.get("source"),
                "created": v.meta.get("created_at"),
                "by": v.meta.get("created_by"),
                "reviews": reviews.get("n_labelled"),
            }
        )
    return pd.DataFrame(rows)


def monitoring_page(store: ReviewStore, run_dir: str | os.PathLike) -> None:
    """The page body (the app checks the admin role before calling it)."""
    run_dir = Path(run_dir)
    st.header("Monitoring")
    weights = run_dir / WEIGHTS
    card = read_json(run_dir / METRICS) if (run_dir / METRICS).is_file() else None
    with reported("Monitoring"):
        sha = _weights_sha256(str(weights), weights.stat().st_mtime_ns)
        st.caption(
            f"Reviews of weights {sha[:12]} · active calibration {active_name(run_dir)} · "
            f"drift window: the last {RECENT} labelled reviews per finding"
        )
        mons = _monitoring(store, store.display_url, sha, store.count(), card)
        if not mons:
            st.info("No reviews of this model yet: monitoring starts with the first review.")
            return
        drifting = [m for m in mons if m.drift]
        if drifting:
            st.error("Drift: " + " · ".join(f"**{m.finding}**: {'; '.join(m.drift)}" for m in drifting), icon="🚨")
        elif card is None:
            st.info(f"{run_dir / METRICS} is missing: there are no model-card bounds, so drift is not checked.")
        st.dataframe(pd.DataFrame([m.row() for m in mons]), hide_index=True, key="monitor_table")
        by_name = {m.finding: m for m in mons}
        chosen = by_name[st.selectbox("Finding", list(by_name), key="monitor_finding")]
        left, right = st.columns(2)
        with left:
            fig = reliability_figure(chosen)
            st.pyplot(fig)
            plt.close(fig)
        with right:
            st.subheader("Weekly trend")
            weekly = chosen.weekly.set_index("week")
            if len(weekly) > 1:
                st.line_chart(weekly[["agreement", "positive_rate", "mean_prob"]].astype(np.float64))
            st.dataframe(weekly, key="monitor_weekly")
        with st.expander("Calibration versions"):
            st.dataframe(_versions_table(run_dir), hide_index=True, key="monitor_versions")
