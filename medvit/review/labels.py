"""A review verdict as a label: what the reviewer says about the finding itself, for site recalibration.

The app asks whether the reader agrees with the flag shown, so the label depends on that flag: agreeing with a
flag means present, agreeing with "below threshold" means absent, disagreeing means the opposite. Uncertain is
a missing label (None), never a negative: counting it as absent would teach the calibrator that unclear cases
are healthy.
"""

from __future__ import annotations

from typing import Literal, get_args

Label = Literal["present", "absent"]
LABELS: tuple[str, ...] = get_args(Label)


def verdict_label(verdict: str, flagged: bool) -> Label | None:
    """The label that `verdict` (agree / disagree / uncertain) on a finding shown as `flagged` amounts to."""
    if verdict == "uncertain":
        return None
    if verdict not in ("agree", "disagree"):
        raise ValueError(f"verdict {verdict!r} is not one of agree, disagree, uncertain")
    present = flagged if verdict == "agree" else not flagged
    return "present" if present else "absent"


def label_verdict(label: Label | None, flagged: bool) -> str:
    """The inverse of `verdict_label`: the verdict that states `label` against the flag shown (for imports)."""
    if label is None:
        return "uncertain"
    return "agree" if (label == "present") == flagged else "disagree"
