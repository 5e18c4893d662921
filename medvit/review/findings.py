"""The findings list with the review in it: one compact row per finding, the reader's verdict inline.

Each row: the finding; its calibrated probability on a bar with the operating threshold marked; a coloured
flag; the model card's AUROC (ECE in the tooltip); present / absent / uncertain. Flagged findings come first,
"Show all findings" adds the rest. Findings the run must not report (`medvit.evaluate.reporting`) are greyed
with the reason and never flagged. Keys (`medvit.review.keys`): j / k move between rows, p / a / u set the
verdict of the current row.
Every number is shown at `PROB_DECIMALS`, the rounding the flags are decided at.
"""

from __future__ import annotations

import html
from typing import cast

import streamlit as st

from medvit.evaluate.metrics import PROB_DECIMALS
from medvit.evaluate.reporting import ModelCard
from medvit.review.accounts import LOCAL_ACCOUNT, Account
from medvit.review.checks import Verdict
from medvit.review.labels import Label, label_verdict
from medvit.review.panels import reported
from medvit.review.service import Analysis, findings_table
from medvit.review.store import ReviewStore
from medvit.review.tables import NOTE_MAX, REVIEWER_MAX

READINGS = ("present", "absent", "uncertain")  # what the reader says about the finding itself
_LABELS = "_medvit_labels"  # st.session_state: {image key: {finding: reading}}, kept while rows are hidden
_SAVED = "_medvit_saved"  # st.session_state: {image key: (review id, message)}, for the page run after a save
MEANING = (
    "**present / absent** is your reading of the image, whatever the model says. For a finding below its "
    "threshold, *absent* agrees with the model and *present* records a miss; for a flagged finding, *present* "
    "agrees. *uncertain* is stored as no label. Keys: **j / k** move between rows, **p / a / u** set the verdict."
)


# Compact verdict buttons, and a verdict column that keeps room for all three ("uncertain" was cut off at 1600 px):
# where the row is too narrow for it (a 1280 px window beside the sidebar) it wraps under the finding instead.
_ROW_CSS = """<style>
[class*="st-key-frow_"] [data-testid="stColumn"]:has([data-testid="stButtonGroup"]) { min-width: 11rem; }
[class*="st-key-frow_"] [data-testid="stButtonGroup"] button { padding: 0.1rem 0.5rem; min-height: 2rem; }
[class*="st-key-frow_"] [data-testid="stButtonGroup"] button p { font-size: 0.85rem; }
</style>"""


def _fmt(x: float) -> str:
    return f"{x:.{PROB_DECIMALS}f}"


def _bar(prob: float, threshold: float, flag: bool, reported_: bool) -> str:
    """The probability as a bar, with the threshold as a tick (HTML; the numbers are also written out)."""
    colour = "#9e9e9e" if not reported_ else ("#d9480f" if flag else "#2b8a3e")
    p, t = min(max(prob, 0.0), 1.0) * 100, min(max(threshold, 0.0), 1.0) * 100
    return (
        f'<div title="calibrated probability {_fmt(prob)}, threshold {_fmt(threshold)}" '
        'style="position:relative;height:14px;background:#e9ecef;border-radius:3px;margin-top:6px">'
        f'<div style="width:{p:.1f}%;height:100%;background:{colour};border-radius:3px"></div>'
        f'<div style="position:absolute;left:{t:.1f}%;top:-3px;width:2px;height:20px;background:#212529"></div>'
        f'</div><div style="font-size:0.8em;color:#495057">{_fmt(prob)} · threshold {_fmt(threshold)}</div>'
    )


def _flag(flag: bool, reported_: bool, reason: str) -> str:
    if not reported_:
        return f'<span title="{html.escape(reason)}" style="color:#868e96">not reported</span>'
    if flag:
        return ('<span style="background:#d9480f;color:white;padding:1px 6px;border-radius:4px;white-space:nowrap">'
                "▲ flagged</span>")  # fmt: skip
    return '<span style="color:#2b8a3e">below</span>'


def _remember(store_key: str, finding: str, widget_key: str) -> None:
    st.session_state[_LABELS].setdefault(store_key, {})[finding] = st.session_state.get(widget_key)


def findings_list(analysis: Analysis, card: ModelCard | None, calibrated: bool) -> dict[str, str | None]:
    """Draw the rows and return the reader's readings so far {finding: present/absent/uncertain/None}."""
    pred = analysis.prediction
    if analysis.refusal or pred is None:
        st.error(f"Not scored — this input is outside what the model was made for. {analysis.refusal}")
        return {}
    key = analysis.sha256[:12]
    table = findings_table(pred)
    n_flagged = int(table["flag"].sum())
    st.subheader("Findings")
    if not calibrated:
        st.warning("This run has no calibration: probabilities are raw model outputs and thresholds are 0.5.")
    hidden = len(table) - n_flagged
    show_all = st.toggle(f"Show all findings ({hidden} not flagged)", key=f"all_{key}", value=n_flagged == 0)
    readings = st.session_state.setdefault(_LABELS, {}).setdefault(key, {})
    st.html(_ROW_CSS)
    for i, row in enumerate(table.itertuples(index=False)):
        if not (show_all or row.flag):
            continue
        evidence = card.findings.get(str(row.finding)) if card else None
        with st.container(key=f"frow_{i}_{key}"):
            c1, c2, c3, c4, c5 = st.columns([1.45, 1.75, 1.25, 1.45, 3.1], gap="xsmall", vertical_alignment="center")
            name = html.escape(str(row.finding).replace("_", " "))
            c1.markdown(name if row.reported else f'<span style="color:#868e96">{name}</span>', unsafe_allow_html=True)
            c2.markdown(_bar(row.prob, row.threshold, bool(row.flag), bool(row.reported)), unsafe_allow_html=True)
            c3.markdown(_flag(bool(row.flag), bool(row.reported), str(row.reason)), unsafe_allow_html=True)
            auroc = evidence.auroc if evidence else None
            ece = evidence.ece if evidence else None
            c4.markdown(
                f"AUROC {auroc:.2f}" if auroc is not None else "AUROC —",
                help=f"Model card: AUROC {auroc if auroc is not None else '—'}, "
                f"ECE {f'{ece:.3f}' if ece is not None else '—'} for this finding",
            )  # fmt: skip
            widget = f"lab_{key}_{row.finding}"
            c5.segmented_control(
                f"Your reading: {row.finding}", READINGS, key=widget, label_visibility="collapsed",
                default=readings.get(str(row.finding)), on_change=_remember, args=(key, str(row.finding), widget),
            )  # fmt: skip
            if not row.reported:
                st.caption(f"{row.finding} not reported: {row.reason}. Never flagged; shown for reference only.")
    if not show_all and hidden:
        st.caption(f"{hidden} finding(s) below their threshold or not reported are hidden: 'Show all findings'.")
    st.caption(MEANING)
    return dict(readings)


def review_form(
    store: ReviewStore, analysis: Analysis, readings: dict[str, str | None], model_name: str,
    account: Account = LOCAL_ACCOUNT,
) -> int | None:  # fmt: skip
    """Reviewer, note and "Save review": saving again edits this reader's review of this image (history kept).
    Signed in (site mode), the review is the account's; in local mode the reader types a name.

    A save reruns the page (so the worklist above shows the new status); the run after it shows the message and
    returns the saved review's id (None in any other run).
    """
    pred = analysis.prediction
    if pred is None:
        return None
    key = analysis.sha256[:12]
    flags = dict(zip(pred.table["finding"], pred.table["flag"], strict=True))
    chosen = {f: cast(Verdict, label_verdict(_label(r), bool(flags[f]))) for f, r in readings.items() if r}
    if account.is_local:
        reviewer = st.text_input("Reviewer name", max_chars=REVIEWER_MAX, key="reviewer")
    else:
        reviewer = account.name
        st.caption(f"Reviewing as **{account.name}**")
    note = st.text_area("Note", max_chars=NOTE_MAX, key=f"note_{key}", height=68)
    st.caption(f"{len(chosen)} verdict(s) set.")
    saved = st.session_state.setdefault(_SAVED, {}).pop(key, None)
    if saved is not None:
        st.success(saved[1])
    if not st.button("Save review", key=f"save_{key}", type="primary"):
        return saved[0] if saved is not None else None
    with reported("Review not saved"):
        review_id, edited = store.save_review(
            reviewer=reviewer, image_uid=analysis.image_uid, image_uid_kind=analysis.image_uid_kind,
            model_name=model_name, weights_sha256=pred.weights_sha256, shown=analysis.shown(), verdicts=chosen,
            note=note, user_id=account.id, calibration_version=pred.calibration_version,
        )  # fmt: skip
        message = f"{'Updated' if edited else 'Saved'} review #{review_id} ({len(chosen)} finding(s))."
        st.session_state[_SAVED][key] = (review_id, message)
        st.rerun()  # the worklist, drawn before this form, shows the image as reviewed at once
    return None


def _label(reading: str | None) -> Label | None:
    return None if reading in (None, "uncertain") else cast(Label, reading)
