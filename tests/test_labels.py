"""Review verdicts become labels: agree/disagree against the flag shown, uncertain stays missing."""

import pytest

from medvit.review.labels import label_verdict, verdict_label


@pytest.mark.parametrize(
    ("verdict", "flagged", "label"),
    [
        ("agree", True, "present"),
        ("agree", False, "absent"),
        ("disagree", True, "absent"),
        ("disagree", False, "present"),
        ("uncertain", True, None),
        ("uncertain", False, None),
    ],
)
def test_verdicts_translate_to_labels_and_back(verdict, flagged, label):
    assert verdict_label(verdict, flagged) == label
    assert label_verdict(label, flagged) == verdict


def test_an_unknown_verdict_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        verdict_label("maybe", True)
