from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medvit.data.datasets import XrayDataset, assign_splits, finding_counts, load_labels, patient_overlap
from medvit.data.transforms import build_transforms
from medvit.errors import DatasetError
from medvit.findings import NIH_FINDINGS


def test_load_nih_dev_set(dev_labels, dev_images):
    df = load_labels(dev_labels, dev_images)
    assert len(df) == 337
    assert set(df["split"]) == {"train", "val"}
    assert list(df.columns[-14:]) == list(NIH_FINDINGS)
    counts = finding_counts(df, NIH_FINDINGS).set_index(["split", "finding"])
    # numbers from the dataset's README
    assert counts.loc[("train", "Effusion"), "pos"] == 46 and counts.loc[("val", "Effusion"), "pos"] == 9
    assert counts.loc[("train", "Hernia"), "pos"] == 6
    assert all(Path(p).is_file() for p in df["path"])


def test_dev_split_is_patient_disjoint(dev_labels, dev_images):
    df = load_labels(dev_labels, dev_images)
    assert patient_overlap(df) == {}
    resplit = assign_splits(df, seed=3, val=0.15, calib=0.15, respect_existing=False)
    assert patient_overlap(resplit) == {}
    assert set(resplit["split"]) == {"train", "val", "calib"}
    again = assign_splits(df, seed=3, val=0.15, calib=0.15, respect_existing=False)
    assert (again["split"] == resplit["split"]).all()  # seeded


def test_assign_splits_keeps_patients_together():
    df = pd.DataFrame({"patient_id": ["a", "a", "b", "b", "c", "d", "e", "f", "g", "h"] * 3, "split": None})
    out = assign_splits(df, seed=0, val=0.2, calib=0.2)
    assert out.groupby("patient_id")["split"].nunique().max() == 1
    assert patient_overlap(out) == {}


def test_patient_overlap_is_detected():
    df = pd.DataFrame({"patient_id": ["1", "1", "2"], "split": ["train", "val", "val"]})
    assert patient_overlap(df) == {("train", "val"): ["1"]}


def test_official_split_files(dev_labels, dev_images, tmp_path):
    df = pd.read_csv(dev_labels)
    (tmp_path / "train_val_list.txt").write_text("\n".join(df["Image Index"][:100]))
    (tmp_path / "test_list.txt").write_text("\n".join(df["Image Index"][100:]))
    out = load_labels(dev_labels, dev_images, split_files={"train": tmp_path / "train_val_list.txt",
                                                           "test": tmp_path / "test_list.txt"})
    assert (out["split"] == "train").sum() == 100 and (out["split"] == "test").sum() == 237


def test_missing_files_single_clear_error(dev_labels, dev_images, tmp_path):
    df = pd.read_csv(dev_labels).head(5)
    df.loc[[1, 3], "Image Index"] = ["nope_1.png", "nope_2.png"]
    df.to_csv(tmp_path / "l.csv", index=False)
    with pytest.raises(DatasetError, match=r"2 of 5 image files are missing, first: .*nope_1\.png"):
        load_labels(tmp_path / "l.csv", dev_images)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.drop(columns=["Patient ID"]), "lacks column"),
        (lambda d: d.assign(**{"Finding Labels": "Tumour"}), "unknown finding"),
        (lambda d: pd.concat([d, d.head(1)]), "duplicate image id"),
        (lambda d: d.assign(**{"Image Index": ["../../etc/passwd", *d["Image Index"][1:]]}), "escapes the image root"),
        (lambda d: d.assign(split="holdout"), "unknown split"),
    ],
)
def test_bad_csvs(dev_labels, dev_images, tmp_path, mutate, message):
    mutate(pd.read_csv(dev_labels).head(4)).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DatasetError, match=message):
        load_labels(tmp_path / "bad.csv", dev_images)


def test_wide_format_uncertainty_policies(dev_images, tmp_path):
    names = sorted(p.name for p in dev_images.iterdir())[:3]
    wide = {"Path": names, "Patient ID": ["p1", "p2", "p3"],
            "Pleural Effusion": [1, -1, None], "Cardiomegaly": [0, 1, -1]}
    pd.DataFrame(wide).to_csv(tmp_path / "w.csv", index=False)
    cols = ["Effusion", "Cardiomegaly", "Hernia"]
    ign = load_labels(tmp_path / "w.csv", dev_images, cols, uncertainty="ignore")
    ones = load_labels(tmp_path / "w.csv", dev_images, cols, uncertainty="ones")
    zeros = load_labels(tmp_path / "w.csv", dev_images, cols, uncertainty="zeros")
    assert np.isnan(ign.at[1, "Effusion"]) and ones.at[1, "Effusion"] == 1 and zeros.at[1, "Effusion"] == 0
    assert np.isnan(ign.at[2, "Effusion"])  # blank stays unknown under every policy
    assert ign["Hernia"].isna().all()


def test_dataset_items_from_real_pngs(dev_labels, dev_images):
    df = load_labels(dev_labels, dev_images).head(4)
    pre = {"input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic"}
    ds = XrayDataset(df, NIH_FINDINGS, build_transforms(pre, train=False), cache=True)
    x, y = ds[0]
    assert x.shape == (3, 64, 64) and y.shape == (14,)
    assert -2.0 <= float(x.min()) and float(x.max()) <= 2.0
    assert y.tolist() == df.iloc[0][list(NIH_FINDINGS)].astype(float).tolist()
    assert ds.pixels(0) is ds.pixels(0)  # decoded once, then cached


def test_dataset_augmentation_depends_on_seed_epoch_and_index_only(dev_labels, dev_images):
    from medvit.data.transforms import AugmentConfig

    df = load_labels(dev_labels, dev_images).head(3)
    pre = {"input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.25] * 3}

    def make():
        return XrayDataset(df, NIH_FINDINGS, build_transforms(pre, train=True, aug=AugmentConfig()), seed=5)

    a, b = make(), make()
    b[2], b[1]  # a different access order must not change what index 0 gets
    assert np.array_equal(a[0][0].numpy(), b[0][0].numpy())
    b.set_epoch(1)
    assert not np.array_equal(a[0][0].numpy(), b[0][0].numpy())


def test_a_misspelled_finding_column_is_a_did_you_mean_error(dev_images, tmp_path, capsys):
    """`Efusion` used to be ignored silently: Effusion all unknown, and evaluate dropped the finding."""
    from medvit.cli import main

    names = sorted(p.name for p in dev_images.iterdir())[:3]
    wide = {"Path": names, "Patient ID": ["p1", "p2", "p3"], "Sex": ["F", "M", "F"], "Age": [50, 60, 70],
            "Efusion": [1, 0, 1], "Cardiomegaly": [0, 1, 0]}
    pd.DataFrame(wide).to_csv(tmp_path / "w.csv", index=False)
    with pytest.raises(DatasetError, match="column 'Efusion' is not a known finding; did you mean 'Effusion'"):
        load_labels(tmp_path / "w.csv", dev_images, ["Effusion", "Cardiomegaly"])
    assert main(["data", "check", "--labels", str(tmp_path / "w.csv"), "--images", str(dev_images)]) == 2
    err = capsys.readouterr().err.strip()
    assert "did you mean 'Effusion'" in err and "\n" not in err
    pd.DataFrame(wide).rename(columns={"Efusion": "Effusion"}).to_csv(tmp_path / "ok.csv", index=False)
    ok = load_labels(tmp_path / "ok.csv", dev_images, ["Effusion", "Cardiomegaly"])  # Sex / Age: not finding-like
    assert ok["Effusion"].tolist() == [1, 0, 1]
