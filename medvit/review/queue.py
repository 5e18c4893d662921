"""The worklist as a queue, for a folder and for the PACS alike: clickable rows, previous / next, and each row's
status (reviewed, unreviewed, refused with the reason).

A listing is a DataFrame with at least `uid` (the review key, or None) and `refusal` (why the image will not be
scored, or None); the caller names the columns to show. The position in the queue lives in `st.session_state`,
so uploads, windowing and verdicts never lose the reader's place, and a new session starts on the first row.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

_POS = "_medvit_queue_pos"  # st.session_state: {queue name: row index}
_SEEN = "_medvit_queue_seen"  # the table selection already acted on, so a stale selection does not pull back
SOURCE = "_medvit_source"  # "queue" or "upload": which of the two the page shows


def status(listing: pd.DataFrame, reviewed: set[str]) -> list[str]:
    """Each row's status for the queue: refused (with the reason), reviewed or unreviewed."""
    out = []
    for uid, refusal in zip(listing["uid"], listing["refusal"], strict=True):
        if isinstance(refusal, str) and refusal:
            out.append(f"⛔ refused: {refusal}")
        else:
            out.append("✓ reviewed" if uid in reviewed else "○ unreviewed")
    return out


def _move(name: str, step: int, n: int) -> None:
    pos = st.session_state.setdefault(_POS, {})
    pos[name] = min(max(pos.get(name, 0) + step, 0), n - 1)
    st.session_state[SOURCE] = "queue"


def queue_panel(name: str, listing: pd.DataFrame, columns: list[str], reviewed: set[str]) -> pd.Series | None:
    """Draw the queue in the sidebar and return the current row (None for an empty queue).

    Clicking a row opens it; "◀ Previous" / "Next ▶" (keys b / n) step through the queue.
    """
    if listing.empty:
        st.sidebar.caption("The worklist is empty.")
        return None
    n = len(listing)
    pos = st.session_state.setdefault(_POS, {})
    current = min(pos.get(name, 0), n - 1)
    table_key = f"queue_{name}"
    picked = st.session_state.get(table_key)
    rows = list(getattr(getattr(picked, "selection", None), "rows", []) or [])
    seen = st.session_state.setdefault(_SEEN, {})
    if rows and rows != seen.get(name):  # a new click on a row
        current = pos[name] = int(rows[0])
        st.session_state[SOURCE] = "queue"
    seen[name] = rows
    pos[name] = current
    view = listing[columns].assign(status=status(listing, reviewed))
    view.insert(0, "", ["▶" if i == current else "" for i in range(n)])
    st.sidebar.dataframe(
        view, hide_index=True, key=table_key, on_select="rerun", selection_mode="single-row", width="stretch",
        column_config={"": st.column_config.TextColumn(width=20), "status": st.column_config.TextColumn()},
    )  # fmt: skip
    left, mid, right = st.sidebar.columns([1, 1, 1], vertical_alignment="center")
    left.button("◀ Previous", key=f"prev_{name}", on_click=_move, args=(name, -1, n), disabled=current == 0,
                help="Previous image (key b)")  # fmt: skip
    mid.caption(f"{current + 1} of {n}")
    right.button("Next ▶", key=f"next_{name}", on_click=_move, args=(name, 1, n), disabled=current >= n - 1,
                 help="Next image (key n)")  # fmt: skip
    return listing.iloc[current]
