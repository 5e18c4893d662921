"""Panels of the review app. Layout only: every number comes from medvit.review_service / review_store."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pandas as pd
import streamlit as st

from medvit.errors import MedvitError
from medvit.review.service import Analysis, zero_shot_table

if TYPE_CHECKING:
    from medvit.zeroshot.scorer import ZeroShotScorer
from medvit.review.store import ReviewStore, rows_csv

_log = logging.getLogger("medvit.app")

BANNER = (
    "**Research decision support — not a diagnostic device.** Outputs are model estimates for research use; "
    "they are not a diagnosis and must not replace a clinician's reading of the image."
)
ZERO_SHOT_DOCS = "docs/zeroshot.md"  # where setting up a CLIP model for the app is explained
MASK = "•••••"
_AUDITED = "_audited"  # suffix of the session key that marks a reveal as already audited


@contextmanager
def reported(what: str) -> Iterator[None]:
    """Show a failure as one st.error naming the problem: never a traceback (unexpected ones go to the log)."""
    try:
        yield
    except MedvitError as e:
        message = str(e)  # library messages may already say what failed ("review not saved: ..."): say it once
        st.error(message[:1].upper() + message[1:] if message.lower().startswith(what.lower()) else f"{what}: {e}")
    except Exception as e:  # noqa: BLE001 - the app must never show a traceback
        _log.exception("%s failed", what)
        st.error(f"{what}: unexpected {type(e).__name__}; the details are in the server log.")


def _rows_height(n: int) -> int:
    """Pixel height that shows `n` data-grid rows without an inner scrollbar."""
    return 35 * (n + 1) + 3


def patient_panel(
    identifiers: dict[str, str], *, image_key: str = "", may_reveal: bool = True,
    on_reveal: Callable[[], None] | None = None,
) -> None:  # fmt: skip
    """Patient identifiers, masked until the reader deliberately reveals them (never stored or logged).

    The reveal toggle is keyed by the image (`image_key`), so every new image starts masked again.

    `may_reveal` False (a site-mode reviewer) offers no way to reveal them; `on_reveal` runs each time they are
    revealed (site mode audits it), before any identifier is drawn.
    """
    with st.expander("Patient identifiers", expanded=False):
        if not identifiers:
            st.caption("No patient identifiers in this file.")
            return
        if not may_reveal:
            st.caption("Only an admin may reveal patient identifiers.")
            show = False
        else:
            hint = "Masked by default; " + ("each reveal is recorded in the audit trail" if on_reveal else
                                            "revealing them is not recorded") + "; they are never stored."  # fmt: skip
            key = f"show_phi_{image_key}"
            show = st.toggle("Show patient identifiers", value=False, key=key, help=hint,
                             on_change=_revealed(on_reveal, key))  # fmt: skip
            if not show:  # drawn masked: the next switch-on is a new reveal
                st.session_state.pop(key + _AUDITED, None)
        values = list(identifiers.values()) if show else [MASK] * len(identifiers)
        st.dataframe(pd.DataFrame({"field": list(identifiers), "value": values}), hide_index=True, width="stretch")


def _revealed(on_reveal: Callable[[], None] | None, key: str) -> Callable[[], None] | None:
    """The toggle's change callback: `on_reveal` once per switch-on (callbacks run before the page).

    A browser test saw one reveal audited twice, 6 s apart (most likely Streamlit calling the callback again when a
    rerun interrupted the run the change started), so a marker in the session, cleared whenever the page draws the
    toggle off, keeps it to one event per reveal."""
    if on_reveal is None:
        return None

    def changed() -> None:
        if st.session_state.get(key) and not st.session_state.get(key + _AUDITED):
            st.session_state[key + _AUDITED] = True
            on_reveal()

    return changed


def history_panel(store: ReviewStore, analysis: Analysis, own_only: str | None = None) -> None:
    """Stored reviews (this image or all) with a CSV download; only `own_only`'s when given (a reviewer)."""
    st.subheader("Review history" if own_only is None else "Your review history")
    this_only = st.toggle("This image only", value=True, key="history_this")
    filters: dict[str, str] = {"image_uid": analysis.image_uid} if this_only else {}
    if own_only is not None:
        filters["reviewer"] = own_only
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


def zero_shot_panel(load_scorer: Callable[[], ZeroShotScorer], analysis: Analysis, configured: bool) -> None:
    """Free-text prompts and positive/negative pairs against a CLIP model; one line when there is none.

    Results are kept per image and prompts in `st.session_state`, so they survive reruns (windowing, invert).
    """
    with st.expander("Zero-shot probing (CLIP)", expanded=False):
        if not configured:
            st.caption(f"Zero-shot probing needs a CLIP model: set `MEDVIT_CLIP` before starting ({ZERO_SHOT_DOCS}).")
            return
        if not st.toggle("Enable zero-shot probing", key="zs_on", help="Loads the CLIP model named by MEDVIT_CLIP"):
            return
        try:
            scorer = load_scorer()
        except MedvitError as e:
            st.caption(f"No CLIP model could be loaded ({_first_line(e)}); see {ZERO_SHOT_DOCS}.")
            return
        with st.form("zero_shot"):
            prompts = st.text_area("Free-text prompts (one per line)", key="zs_prompts")
            pairs = st.text_area("Positive | negative pairs (one per line; the negative is optional)", key="zs_pairs")
            run = st.form_submit_button("Score prompts")
        results = st.session_state.setdefault("_medvit_zero_shot", {})
        key = (analysis.sha256, prompts, pairs)
        if run:
            with reported("Zero-shot"):
                results[key] = zero_shot_table(scorer, analysis.image, prompts.splitlines(), pairs.splitlines())
        table = results.get(key)
        if table is not None:
            shown = table.assign(
                prob=[
                    f"{p:.3f}" + (" (uncalibrated)" if c == "uncalibrated" else "")
                    for p, c in zip(table["prob"], table["calibration"], strict=True)
                ]
            )
            st.dataframe(shown, hide_index=True, width="stretch", key="zs_table")
            if (table["calibration"] == "uncalibrated").any():
                st.caption("**uncalibrated**: CLIP scores, not probabilities anyone has checked against labels.")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
