"""What the review app's viewer receives: lossless pixel values, presets in the image's units, lossy marking,
the saliency layer. Real DICOMs from pydicom-data and real PNG/JPEG files; no browser."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import testdata as dicom_path
from PIL import Image
from pydicom.encaps import get_frame
from pydicom.uid import JPEG2000

from medvit.data.dicom import read_image
from medvit.data.lossy import j2k_irreversible, lossy_compression
from medvit.review.display import (
    colour_scale,
    encode_pixels,
    heat_layer,
    metadata_rows,
    modality_values,
    overlay_size,
    window_presets,
)


def _decoded(payload) -> np.ndarray:
    """What the browser does with the payload: read the bytes as the named little-endian type."""
    values = np.frombuffer(payload.data, dtype=np.dtype(payload.dtype).newbyteorder("<"))
    return values.reshape(payload.rows, payload.columns).astype(np.float32)


@pytest.mark.parametrize("name", ["RG1_UNCI.dcm", "RG1_J2KR.dcm"])
def test_dicom_payload_round_trips_the_modality_values_exactly(name):
    image = read_image(dicom_path(name))
    payload = encode_pixels(modality_values(image))
    assert payload.dtype == "uint16"  # 15-bit CR: two bytes a pixel, not float32
    assert (payload.rows, payload.columns) == image.raw.shape == (1955, 1841)  # full resolution
    np.testing.assert_array_equal(_decoded(payload), image.raw)


def test_signed_and_fractional_values_keep_every_bit():
    signed = np.array([[-1024.0, 0.0], [3071.0, 12.0]], dtype=np.float32)
    assert encode_pixels(signed).dtype == "int16"
    np.testing.assert_array_equal(_decoded(encode_pixels(signed)), signed)
    fractional = np.array([[0.5, -3.25], [1e6, 7.0]], dtype=np.float32)  # a fractional rescale slope
    assert encode_pixels(fractional).dtype == "float32"
    np.testing.assert_array_equal(_decoded(encode_pixels(fractional)), fractional)
    wide = np.array([[0.0, 70000.0]], dtype=np.float32)  # integers beyond 16 bits
    assert encode_pixels(wide).dtype == "float32"


@pytest.mark.parametrize("top", [255, 65535])
def test_png_payload_is_the_files_own_grey_levels(tmp_path, top):
    rng = np.random.default_rng(0)
    levels = rng.integers(0, top + 1, size=(160, 120)).astype(np.uint16 if top > 255 else np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(levels).save(path)  # 8-bit L or 16-bit I;16
    image = read_image(path)
    payload = encode_pixels(modality_values(image))
    np.testing.assert_array_equal(_decoded(payload), levels.astype(np.float32))
    np.testing.assert_array_equal(_decoded(payload) / np.float32(top), image.pixels)
    assert window_presets(image, modality_values(image))[0].width == top  # shown as stored


def test_presets_start_at_the_header_voi_and_follow_monochrome1_polarity():
    image = read_image(dicom_path("RG1_UNCI.dcm"))  # MONOCHROME1: high values are shown dark
    header, lung, mediastinum = window_presets(image, image.raw)
    assert (header.key, header.center, header.width) == ("V", 15000.0, 30000.0)
    assert [p.key for p in (lung, mediastinum)] == ["L", "M"]
    h, w = image.raw.shape
    spine = float(np.median(image.raw[h // 2 - 50 : h // 2 + 50, w // 2 - 30 : w // 2 + 30]))
    lung_field = float(np.median(image.raw[h // 2 - 100 : h // 2, w // 4 - 50 : w // 4 + 50]))
    assert spine < lung_field  # MONOCHROME1 as the test assumes
    within = lambda p, v: abs(v - p.center) <= p.width / 2  # noqa: E731
    assert within(lung, lung_field) and within(mediastinum, spine)
    assert mediastinum.center < lung.center  # the dense (bright) end is the low end of MONOCHROME1 values


def test_lossy_sources_are_named_and_lossless_ones_are_not(tmp_path):
    assert read_image(dicom_path("RG1_J2KR.dcm")).meta.lossy is None  # reversible J2K, LossyImageCompression 00
    assert "01" in read_image(dicom_path("RG1_UNCI.dcm")).meta.lossy  # uncompressed now, lossy J2K before
    # the header alone: a lossless file that says it was lossy-compressed once
    ds = pydicom.dcmread(dicom_path("RG1_J2KR.dcm"))
    ds.LossyImageCompression = "01"
    assert lossy_compression(ds) == "LossyImageCompression 01"
    # the codestream alone: an irreversible (9/7) JPEG 2000 whose header does not say so
    ds = pydicom.dcmread(dicom_path("RG1_J2KI.dcm"))
    for keyword in ("LossyImageCompression", "LossyImageCompressionMethod", "LossyImageCompressionRatio"):
        ds.pop(keyword, None)
    assert j2k_irreversible(get_frame(ds.PixelData, 0, number_of_frames=1))
    assert lossy_compression(ds) == "JPEG 2000 Image Compression with the irreversible 9/7 wavelet"
    path = tmp_path / "lossy.dcm"
    ds.save_as(path)
    image = read_image(path)
    assert image.meta.lossy and metadata_rows(image.meta)["Compression"].startswith("LOSSY")
    assert metadata_rows(read_image(dicom_path("RG1_J2KR.dcm")).meta)["Compression"] == "lossless"
    jpeg = tmp_path / "x.jpg"
    Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (200, 1))).save(jpeg, quality=90)
    assert read_image(jpeg).meta.lossy == "JPEG file"


def test_lossy_encode_of_a_lossless_source_is_recognised(tmp_path):
    ds = pydicom.dcmread(dicom_path("RG1_J2KR.dcm"))
    arr = ds.pixel_array[:512, :512].copy()
    ds.Rows, ds.Columns = arr.shape
    ds.compress(JPEG2000, arr, j2k_cr=[20])  # irreversible wavelet, as a PACS might store it
    for keyword in ("LossyImageCompression", "LossyImageCompressionMethod", "LossyImageCompressionRatio"):
        ds.pop(keyword, None)
    assert "irreversible" in lossy_compression(ds)


def test_saliency_layer_is_transparent_below_the_cutoff():
    heat = np.linspace(0.0, 1.0, 100, dtype=np.float32).reshape(10, 10)
    rgba = np.asarray(Image.open(io.BytesIO(heat_layer(heat, cutoff=0.5, opacity=0.6))))
    assert rgba.shape == (10, 10, 4)
    alpha = rgba[..., 3]
    assert (alpha[heat < 0.5] == 0).all() and (alpha[heat >= 0.5] == round(0.6 * 255)).all()
    blank = np.asarray(Image.open(io.BytesIO(heat_layer(np.zeros((4, 4), np.float32), 0.0, 1.0))))
    assert (blank[..., 3] == 0).all()  # a blank map shows nothing, even with no cut-off
    assert colour_scale().startswith("data:image/png;base64,")
    assert overlay_size(1955, 1841) == (512, 482) and overlay_size(100, 50) == (100, 50)


def test_top_finding_prefers_flagged_then_reported():
    from medvit.review.viewer import top_finding

    table = pd.DataFrame({
        "finding": ["A", "B", "C", "D"], "prob": [0.9, 0.4, 0.6, 0.3], "flag": [False, True, True, False],
        "reported": [False, True, True, True],
    })  # fmt: skip
    assert top_finding(table) == "C"  # A is the most probable, but not reported
    assert top_finding(table.assign(flag=False)) == "C"  # nothing flagged: the most probable reported one
    assert top_finding(table.drop(columns="reported").assign(flag=False)) == "A"
