"""`medvit prepare`: the uint8 cache round trip through load_labels, resume, and bad images."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medvit.cli import main
from medvit.data.cache import ERRORS, SOURCE, prepare_cache, to_uint8
from medvit.data.datasets import label_matrix, load_labels
from medvit.data.dicom import read_image
from medvit.findings import DEFAULT_FINDINGS


def test_nih_cache_round_trip_and_resume(dev_subset_csv, dev_images, tmp_path):
    cache = tmp_path / "cache"
    assert main(["prepare", "--labels", str(dev_subset_csv), "--images", str(dev_images), "--out", str(cache),
                 "--size", "256", "--workers", "2"]) == 0
    original = load_labels(dev_subset_csv, dev_images)
    cached = load_labels(cache / "manifest.csv", cache)  # training and evaluation read the cache like this
    assert list(cached["image_id"]) == list(original["image_id"])
    for col in ("patient_id", "view", "split"):
        assert list(cached[col]) == list(original[col])
    np.testing.assert_array_equal(label_matrix(cached, DEFAULT_FINDINGS), label_matrix(original, DEFAULT_FINDINGS))
    assert all(p.startswith(str(cache)) for p in cached["path"])
    manifest = pd.read_csv(cache / "manifest.csv")
    assert list(manifest[SOURCE]) == list(original["path"])
    assert "source_path" in manifest.columns  # the NIH CSV's own columns are kept untouched

    first_src, first_png = original["path"].iloc[0], cached["path"].iloc[0]
    png = np.asarray(Image.open(first_png))
    assert png.dtype == np.uint8 and max(png.shape) == 256
    expected = to_uint8(read_image(first_src).pixels, 256)
    assert np.abs(png.astype(int) - expected.astype(int)).max() == 0
    decoded = read_image(first_png).pixels  # the cache is an ordinary image for read_image
    assert np.abs(decoded - png / 255.0).max() < 1e-6

    again = prepare_cache(dev_subset_csv, dev_images, cache, size=256, progress=False)
    assert again.n_decoded == 0 and again.n_reused == len(original)


def test_wide_csv_with_a_dicom_and_a_broken_file(tmp_path, cxr_dicom):
    images = tmp_path / "images"
    (images / "p1").mkdir(parents=True)
    shutil.copy(cxr_dicom, images / "p1" / "cr.dcm")  # a symlink would resolve outside the image root
    (images / "p2").mkdir()
    (images / "p2" / "broken.dcm").write_bytes(b"DICM" * 10)
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"Path": ["p1/cr.dcm", "p2/broken.dcm"], "Patient ID": ["1", "2"], "Effusion": [1, 0],
                  "Cardiomegaly": [0, -1]}).to_csv(csv, index=False)
    result = prepare_cache(csv, images, tmp_path / "cache", size=128, workers=0, progress=False)
    assert (result.n_images, result.n_decoded, result.n_errors) == (2, 1, 1)
    errors = pd.read_csv(tmp_path / "cache" / ERRORS)
    assert errors[SOURCE].iloc[0].endswith("broken.dcm") and len(errors["error"].iloc[0]) > 10
    cached = load_labels(tmp_path / "cache" / "manifest.csv", tmp_path / "cache")
    assert list(cached["image_id"]) == ["p1/cr.png"]
    assert cached["Effusion"].iloc[0] == 1
    png = np.asarray(Image.open(cached["path"].iloc[0]))
    original = read_image(cxr_dicom).pixels  # MONOCHROME1 CR: the cache holds the display-ready (inverted) pixels
    assert max(png.shape) == 128 and abs(png.shape[0] / png.shape[1] - original.shape[0] / original.shape[1]) < 0.02
    small = to_uint8(original, 128) / 255.0
    assert np.abs(png / 255.0 - small).max() < 1e-9


def test_refuses_to_cache_into_the_image_folder(dev_subset_csv, dev_images):
    from medvit.errors import DatasetError

    with pytest.raises(DatasetError, match="must differ"):
        prepare_cache(dev_subset_csv, dev_images, dev_images)
