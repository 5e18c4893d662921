"""Panels of the review app. Layout only: every number comes from medvit.review_service / review_store."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import pandas as pd
import streamlit as st

from medvit.errors import MedvitError
from medvit.review.service import Analysis, ReviewService, findings_table, zero_shot_table
from medvit.review.store import NOTE_MAX, REVIEWER_MAX, VERDICTS, ReviewStore, Verdict, rows_csv

_log = logging.getLogger("medvit.app")

BANNER = (
    "**Research decision support — not a diagnostic device.** Outputs are model estimates for research use; "
    "they are not a diagnosis and must not replace a clinician's reading of the image."
)
NO_VERDICT = "—"
MASK = "•••••"


@contextmanager
def reported(what: str) -> Iterator[None]:
    """Show a failure as one st.error naming the problem: never a traceback (unexpected ones go to the log)."""
    try:
        yield
    except MedvitError as e:
        st.error(f"{what}: {e}")
    except Exception as e:  # noqa: BLE001 - the app must never show a traceback
        _log.exception("%s failed", what)
        st.error(f"{what}: unexpected {type(e).__name__}; the details are in the server log.")


def _rows_height(n: int) -> int:
    """Pixel height that shows `n` data-grid rows without an inner scrollbar."""
    return 35 * (n + 1) + 3


def patient_panel(identifiers: dict[str, str]) -> None:
    """Patient identifiers, masked until the reader deliberately reveals them (nothing is stored or logged)."""
    with st.expander("Patient identifiers", expanded=False):
        if not identifiers:
            st.caption("No patient identifiers in this file.")
            return
        hint = "Masked by default; revealing them is not recorded and they are never stored."
        show = st.toggle("Show patient identifiers", value=False, key="show_phi", help=hint)
        values = list(identifiers.values()) if show else [MASK] * len(identifiers)
        st.dataframe(pd.DataFrame({"field": list(identifiers), "value": values}), hide_index=True, width="stretch")


def findings_panel(service: ReviewService, analysis: Analysis) -> pd.DataFrame | None:
    """The findings table, or a refusal that explains why there are no numbers."""
    if analysis.refusal or analysis.prediction is None:
        st.error(f"Not scored — this input is outside what the model was made for. {analysis.refusal}")
        return None
    pred = analysis.prediction
    table = findings_table(pred, service.model_card)
    view = pd.DataFrame({
        "finding": table["finding"],
        "probability (calibrated)": table["prob"],
        "threshold": table["threshold"],
        "flag": ["above" if f else "below" for f in table["flag"]],
        "raw probability": table["prob_raw"],
    })  # fmt: skip
    if "auroc" in table:
        view["model card AUROC"] = table["auroc"]
        view["model card ECE"] = table["ece"]
    st.subheader("Findings")
    if not pred.calibrated:
        st.warning("This run has no calibration: probabilities are raw model outputs and thresholds are 0.5.")
    st.dataframe(
        view, hide_index=True, width="stretch", height=_rows_height(len(view)),
        column_config={
            "probability (calibrated)": st.column_config.ProgressColumn(format="%.3f", min_value=0.0, max_value=1.0),
            "threshold": st.column_config.NumberColumn(format="%.3f"),
            "raw probability": st.column_config.NumberColumn(format="%.3f"),
            "model card AUROC": st.column_config.NumberColumn(format="%.3f"),
            "model card ECE": st.column_config.NumberColumn(format="%.3f"),
        },
    )  # fmt: skip
    st.caption(
        "Sorted by how far the calibrated probability sits past the finding's operating threshold. "
        + ("Model card: AUROC and ECE per finding from this run's evaluation." if "auroc" in table
           else "No metrics.json in this run: model card metrics unavailable.")
    )  # fmt: skip
    return table


def feedback_form(store: ReviewStore, analysis: Analysis, table: pd.DataFrame, model_name: str) -> None:
    """Agree / disagree / uncertain per finding, a note and the reviewer's name, saved in one transaction."""
    key = analysis.sha256[:12]
    with st.form(f"feedback_{key}"):
        st.subheader("Your review")
        verdicts = {}
        for finding, prob, flag in zip(table["finding"], table["prob"], table["flag"], strict=True):
            label = f"{finding} — {prob:.2f} ({'above' if flag else 'below'} threshold)"
            verdicts[finding] = st.radio(label, [NO_VERDICT, *VERDICTS], horizontal=True, key=f"v_{key}_{finding}")
        reviewer = st.text_input("Reviewer name", max_chars=REVIEWER_MAX, key="reviewer")
        note = st.text_area("Note", max_chars=NOTE_MAX, key=f"note_{key}")
        submitted = st.form_submit_button("Save review")
    if submitted and analysis.prediction is not None:
        chosen = {f: cast(Verdict, v) for f, v in verdicts.items() if v != NO_VERDICT}  # the store checks them
        with reported("Review not saved"):
            review_id = store.add_review(
                reviewer=reviewer, image_uid=analysis.image_uid, image_uid_kind=analysis.image_uid_kind,
                model_name=model_name, weights_sha256=analysis.prediction.weights_sha256,
                shown=analysis.shown(), verdicts=chosen, note=note,
            )  # fmt: skip
            st.success(f"Saved review #{review_id} ({len(chosen)} finding(s)).")


def history_panel(store: ReviewStore, analysis: Analysis) -> None:
    """Stored reviews (this image or all) with a CSV download."""
    st.subheader("Review history")
    this_only = st.toggle("This image only", value=True, key="history_this")
    filters = {"image_uid": analysis.image_uid} if this_only else {}
    with reported("Review history"):
        rows = store.history_rows(**filters)
        if rows:
            order = ["created_at", "reviewer", "finding", "verdict", "prob", "threshold", "note", "model_name",
                     "image_uid", "review_id"]  # fmt: skip
            st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", column_order=order)
        else:
            st.caption("No reviews stored yet" + (" for this image." if this_only else "."))
        st.download_button("Download CSV", rows_csv(rows), file_name="medvit_reviews.csv",
                           mime="text/csv", key="history_csv")  # fmt: skip
        st.caption(f"Database: {store.display_url}")


def zero_shot_panel(load_scorer, analysis: Analysis) -> None:
    """Free-text prompts and positive/negative pairs against a CLIP model (explains set-up when there is none)."""
    with st.expander("Zero-shot probing (CLIP)", expanded=False):
        if not st.toggle("Enable zero-shot probing", key="zs_on", help="Loads the CLIP model named by MEDVIT_CLIP"):
            return
        try:
            scorer = load_scorer()
        except MedvitError as e:
            st.info(
                "Zero-shot probing needs a CLIP model, and none could be loaded. Set `MEDVIT_CLIP` before starting "
                "the app, e.g. `open_clip:local-dir:/models/clip` (a folder from `hf download`), "
                "`transformers:/models/clip` or a hub id already in the local cache; optionally "
                "`MEDVIT_CLIP_TEMPERATURES` to a temperatures.json from `medvit zeroshot-eval --fit-split`. "
                f"Details: {e}"
            )
            return
        with st.form("zero_shot"):
            prompts = st.text_area("Free-text prompts (one per line)", key="zs_prompts")
            pairs = st.text_area("Positive | negative pairs (one per line; the negative is optional)", key="zs_pairs")
            run = st.form_submit_button("Score prompts")
        if run:
            with reported("Zero-shot"):
                table = zero_shot_table(scorer, analysis.image, prompts.splitlines(), pairs.splitlines())
                st.dataframe(table, hide_index=True, width="stretch", key="zs_table")
                if (table["calibration"] == "uncalibrated").any():
                    st.caption("**uncalibrated**: CLIP scores, not probabilities anyone has checked against labels.")
