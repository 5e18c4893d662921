import numpy as np
import pandas as pd
import pytest

from medvit.errors import DatasetError
from medvit.findings import ALL_FINDINGS, NIH_FINDINGS, NO_FINDING, align_labels, canonical, resolve_findings


def test_canonical_aliases_across_datasets():
    assert canonical("Pleural Effusion") == "Effusion"
    assert canonical("pleural thickening") == "Pleural_Thickening"
    assert canonical("No Finding") == NO_FINDING
    assert canonical("CARDIOMEGALY") == "Cardiomegaly"
    with pytest.raises(DatasetError, match="unknown finding 'Tumour'"):
        canonical("Tumour")


def test_resolve_findings_rejects_duplicates():
    with pytest.raises(DatasetError, match="more than once"):
        resolve_findings(["Effusion", "Pleural Effusion"])


def test_align_nih_format():
    df = pd.DataFrame({"Finding Labels": ["Effusion|Mass", "No Finding", "Pleural_Thickening"]})
    y = align_labels(df, ALL_FINDINGS)
    col = {f: i for i, f in enumerate(ALL_FINDINGS)}
    assert y.shape == (3, 15)
    assert y[0, col["Effusion"]] == 1 and y[0, col["Mass"]] == 1 and y[0, col["Atelectasis"]] == 0
    assert y[1, col[NO_FINDING]] == 1 and y[1, : len(NIH_FINDINGS)].sum() == 0
    assert y[2, col["Pleural_Thickening"]] == 1
    assert not np.isnan(y).any()  # NIH labels every finding for every image


def test_align_wide_format_missing_columns_are_unknown():
    df = pd.DataFrame({"Pleural Effusion": [1, 0, np.nan], "Cardiomegaly": [0, 0, 1]})
    y = align_labels(df, ["Effusion", "Cardiomegaly", "Hernia", NO_FINDING])
    assert y[0].tolist()[:2] == [1, 0]
    assert np.isnan(y[2, 0]) and y[2, 1] == 1
    assert np.isnan(y[:, 2]).all()  # no Hernia column -> unknown, not negative
    # No Finding: 0 when any positive; unknown when some labels are unknown and none positive
    assert y[0, 3] == 0 and y[2, 3] == 0 and np.isnan(y[1, 3])


def test_align_rejects_unknown_nih_labels():
    with pytest.raises(DatasetError, match="unknown finding"):
        align_labels(pd.DataFrame({"Finding Labels": ["Effusion|Tumour"]}))


def test_align_wide_refuses_text_labels():
    with pytest.raises(DatasetError, match="non-numeric labels such as 'yes'"):
        align_labels(pd.DataFrame({"Effusion": ["1", "yes", ""]}), ["Effusion"])
