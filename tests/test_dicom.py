"""read_image on real files: pydicom-data DICOMs (CR chest, CT, MR, US, RT plan, colour captures), the NIH dev PNGs,
and edited copies of them (header changes, truncation, fake identifiers) written to memory or tmp_path."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import testdata as dcm_file
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.pixels import apply_modality_lut, apply_windowing, get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless

from medvit.data import dicom
from medvit.data.dicom import ImageMeta, apply_window, check_chest_frontal, read_image
from medvit.errors import ImageReadError, ImageTooLargeError, MissingDecoderError, UnsupportedImageError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's warnings about odd test-file values


@pytest.fixture(scope="module")
def cr():
    """RG1_UNCI.dcm read once: a 15-bit MONOCHROME1 PA chest CR with a 15000/30000 window."""
    return read_image(dcm_file("RG1_UNCI.dcm"))


@pytest.fixture(scope="module")
def cr_ds() -> Dataset:
    return pydicom.dcmread(dcm_file("RG1_UNCI.dcm"))


def variant(ds: Dataset, **changes) -> bytes:
    """The file's bytes after setting (value) or deleting (None) header elements, on a copy."""
    ds = copy.deepcopy(ds)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def regions(pixels: np.ndarray) -> tuple[float, float, float]:
    """Mean of the left lung field, right lung field and the central (spine/mediastinum) strip."""
    h, w = pixels.shape
    rows = slice(int(0.3 * h), int(0.7 * h))
    left = pixels[rows, int(0.1 * w) : int(0.3 * w)].mean()
    right = pixels[rows, int(0.7 * w) : int(0.9 * w)].mean()
    centre = pixels[rows, int(0.45 * w) : int(0.55 * w)].mean()
    return float(left), float(right), float(centre)


# ---------------------------------------------------------------- the pixel chain


def test_chest_cr_is_display_ready(cr):
    assert cr.pixels.dtype == np.float32 and cr.pixels.shape == (1955, 1841)
    assert 0.0 <= cr.pixels.min() < cr.pixels.max() <= 1.0
    assert cr.raw is not None and cr.raw.dtype == np.float32 and cr.raw.shape == cr.pixels.shape
    assert cr.meta.photometric_interpretation == "MONOCHROME1" and cr.meta.inverted
    assert (cr.meta.voi_source, cr.meta.window_center, cr.meta.window_width) == ("window", 15000.0, 30000.0)


def test_monochrome1_lungs_darker_than_spine_and_mediastinum(cr):
    left, right, centre = regions(cr.pixels)
    assert left < centre - 0.1 and right < centre - 0.1, (left, right, centre)
    # the stored values are the other way round: the inversion is what makes the lungs dark
    raw_left, raw_right, raw_centre = regions(cr.raw)
    assert raw_left > raw_centre and raw_right > raw_centre


def test_window_matches_pydicom_scaled_by_its_output_range(cr, cr_ds):
    """pydicom's windowing maps to [0, 2**15 - 1] for this file; ours is the same curve on [0, 1], then inverted."""
    ref = apply_windowing(apply_modality_lut(cr_ds.pixel_array, cr_ds), cr_ds) / (2**15 - 1)
    np.testing.assert_allclose(cr.pixels, 1.0 - ref, atol=1e-6)


@pytest.mark.parametrize("name, min_side", [("RG1_UNCI.dcm", None), ("RG1_J2KR.dcm", 384)])
def test_a_parsed_dataset_reads_as_its_file_does_and_is_left_unchanged(name, min_side):
    """The PACS path decodes the retrieved dataset itself (no second parse): the same image, level and warnings."""
    path = dcm_file(name)
    ds = pydicom.dcmread(path)
    before = copy.deepcopy(ds)
    got = dicom.read_dataset(ds, name=name, min_side=min_side)
    want = read_image(path, name=name, min_side=min_side)
    assert np.array_equal(got.pixels, want.pixels) and got.meta == want.meta
    assert ds == before and ds.PixelData == before.PixelData
    ct = pydicom.dcmread(dcm_file("CT_small.dcm"))
    with pytest.raises(UnsupportedImageError, match=r"^CT_small\.dcm: Modality CT"):
        dicom.read_dataset(ct, name="CT_small.dcm")


def test_lossless_jpeg2000_decodes_to_identical_pixels():
    unc = read_image(dcm_file("RG1_UNCR.dcm"))
    j2k = read_image(dcm_file("RG1_J2KR.dcm"))
    assert j2k.meta.transfer_syntax == JPEG2000Lossless
    np.testing.assert_array_equal(unc.raw, j2k.raw)
    np.testing.assert_array_equal(unc.pixels, j2k.pixels)


def test_lossy_jpeg2000_decodes_to_nearly_identical_pixels(cr):
    j2k = read_image(dcm_file("RG1_J2KI.dcm"))
    assert j2k.meta.transfer_syntax == "1.2.840.10008.1.2.4.91"
    assert np.abs(j2k.pixels - cr.pixels).max() < 0.02


def test_no_window_falls_back_to_minmax_of_the_data(cr_ds, cr):
    img = read_image(variant(cr_ds, WindowCenter=None, WindowWidth=None))
    assert img.meta.voi_source == "minmax"
    assert img.pixels.min() == 0.0 and img.pixels.max() == 1.0
    lo, hi = cr.raw.min(), cr.raw.max()
    np.testing.assert_allclose(img.pixels, 1.0 - (cr.raw - lo) / (hi - lo), atol=1e-6)


def test_voi_lut_normalised_by_the_tables_actual_range(cr_ds, cr):
    """A 16-bit-nominal LUT holding 0..4095 (common) must still use the full display range."""
    ds = copy.deepcopy(cr_ds)
    n = 2**15
    table = np.round(4095 * (np.arange(n) / (n - 1)) ** 0.5).astype(np.uint16)  # a gamma curve
    item = Dataset()
    item.LUTDescriptor = [n, 0, 16]
    item.add_new("LUTData", "OW", table.astype("<u2").tobytes())  # > 64 kB: OW, as real files do
    ds.VOILUTSequence = Sequence([item])
    img = read_image(variant(ds))
    assert img.meta.voi_source == "voi_lut"
    expected = 1.0 - table[np.clip(cr.raw.astype(np.int64), 0, n - 1)] / 4095.0
    np.testing.assert_allclose(img.pixels, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("photometric", "shape", "flipped"),
    [("MONOCHROME1", "INVERSE", False), ("MONOCHROME2", "INVERSE", False), ("MONOCHROME2", "IDENTITY", True)],
)
def test_presentation_shape_and_monochrome1_invert_once(cr_ds, cr, photometric, shape, flipped):
    img = read_image(variant(cr_ds, PhotometricInterpretation=photometric, PresentationLUTShape=shape))
    expected = 1.0 - cr.pixels if flipped else cr.pixels
    np.testing.assert_allclose(img.pixels, expected, atol=1e-6)
    assert img.meta.inverted is not flipped


def test_apply_window_round_trips_every_linear_rendering(cr, cr_ds):
    minmax = read_image(variant(cr_ds, WindowCenter=None, WindowWidth=None))
    rgb = read_image(dcm_file("SC_rgb.dcm"))
    for img in (cr, minmax, rgb):
        m = img.meta
        raw = img.raw.copy()
        np.testing.assert_array_equal(apply_window(img.raw, m.window_center, m.window_width, m.inverted), img.pixels)
        np.testing.assert_array_equal(img.raw, raw)  # windowing works in place on its own copy, never on raw
    # re-windowing really changes the picture: a narrow window saturates more pixels
    narrow = apply_window(cr.raw, 15000, 5000, True)
    assert ((narrow == 0) | (narrow == 1)).mean() > ((cr.pixels == 0) | (cr.pixels == 1)).mean() + 0.2


def test_apply_window_rejects_invalid_widths():
    with pytest.raises(ValueError, match="too small"):
        apply_window(np.zeros((2, 2)), 0, 0.5)
    with pytest.raises(ValueError, match="VOI LUT function"):
        apply_window(np.zeros((2, 2)), 0, 10, function="CUBIC")


def test_sigmoid_voi_function_is_honoured_and_reported(cr_ds, cr):
    img = read_image(variant(cr_ds, VOILUTFunction="SIGMOID"))
    np.testing.assert_allclose(img.pixels, apply_window(cr.raw, 15000, 30000, True, function="SIGMOID"), atol=1e-6)
    assert any("SIGMOID" in w for w in img.meta.warnings)


# ---------------------------------------------------------------- colour and compressed syntaxes


@pytest.mark.parametrize("name", ["SC_rgb.dcm", "SC_ybr_full_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_colour_secondary_captures_become_grey_with_a_warning(name):
    img = read_image(dcm_file(name))
    ds = pydicom.dcmread(dcm_file(name))
    rgb = ds.pixel_array.astype(np.float32)  # pydicom converts YBR to RGB
    np.testing.assert_allclose(img.pixels, (rgb @ [0.299, 0.587, 0.114]) / 255.0, atol=1e-5)
    assert img.pixels.ndim == 2 and img.meta.modality == "OT"
    assert any("converted to grayscale" in w for w in img.meta.warnings)
    assert any("cannot confirm this is a radiograph" in w for w in img.meta.warnings)


def test_rle_decodes_like_the_uncompressed_original():
    np.testing.assert_array_equal(
        read_image(dcm_file("SC_rgb_rle.dcm")).pixels, read_image(dcm_file("SC_rgb.dcm")).pixels
    )


def test_missing_decoder_names_the_syntax_and_the_extra(monkeypatch):
    """Simulate an install without pylibjpeg/openjpeg/gdcm: pydicom's JPEG 2000 decoder has no plugin left."""
    path = dcm_file("RG1_J2KR.dcm")
    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})
    with pytest.raises(RuntimeError, match="missing dependencies"):  # the simulation is real for pydicom too
        _ = pydicom.dcmread(path).pixel_array
    with pytest.raises(MissingDecoderError) as info:
        read_image(path)
    msg = str(info.value)
    assert "JPEG 2000 Image Compression (Lossless Only)" in msg and str(JPEG2000Lossless) in msg
    assert 'pip install "medvit[dicom]"' in msg
    assert isinstance(info.value, ImageReadError)


def relabel(ds: Dataset, syntax: str) -> bytes:
    """The file with native pixels but file meta claiming `syntax` (pydicom refuses to write it in one go)."""
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    meta = FileMetaDataset(copy.deepcopy(ds.file_meta))  # a shallow copy would relabel the shared fixture too
    meta.TransferSyntaxUID = syntax
    head = DicomBytesIO()
    write_file_meta_info(head, meta)
    return b"\0" * 128 + b"DICM" + head.getvalue() + body.getvalue()


def test_syntax_without_any_pydicom_decoder_says_converting_is_the_fix(cr_ds):
    with pytest.raises(
        MissingDecoderError, match=r"MPEG2 Main Profile / Main Level \(1.2.840.10008.1.2.4.100\)"
    ) as info:
        read_image(relabel(cr_ds, "1.2.840.10008.1.2.4.100"))
    assert "convert the file to an uncompressed syntax" in str(info.value)
    with pytest.raises(ImageReadError, match="unknown transfer syntax 1.2.3.4"):
        read_image(relabel(cr_ds, "1.2.3.4"))
    with pytest.raises(ImageReadError, match="JPEG Baseline.*cannot be decoded"):
        read_image(relabel(cr_ds, "1.2.840.10008.1.2.4.50"))


def test_damaged_value_representation_is_a_read_error():
    data = Path(dcm_file("RG1_UNCI.dcm")).read_bytes()
    modality_cs = b"\x08\x00\x60\x00CS"
    assert modality_cs in data
    with pytest.raises(ImageReadError, match="corrupt DICOM header"):
        read_image(data.replace(modality_cs, b"\x08\x00\x60\x00C\x7f", 1))


def test_corrupt_jpeg_that_aborts_gdcm_is_a_read_error_not_a_dead_process():
    """One flipped byte in a real JPEG DICOM makes GDCM abort the interpreter (uncaught C++ exception);
    read_image prefers the other plugins, so the app survives. Run in a child process, as a crash would be fatal."""
    code = (
        "import sys\n"
        "from medvit.data.dicom import read_image\n"
        "from medvit.errors import ImageReadError\n"
        "data = bytearray(open(sys.argv[1], 'rb').read())\n"
        "data[1712] = 108\n"
        "try:\n"
        "    read_image(bytes(data))\n"
        "except ImageReadError as exc:\n"
        "    print('ImageReadError:', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, dcm_file("SC_rgb_jpeg_dcmtk.dcm")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ImageReadError: uploaded image: the JPEG Baseline (Process 1) pixel data cannot be decoded" in done.stdout
    assert "pylibjpeg" in done.stdout  # the plugin's own reason is kept on the one line


# ---------------------------------------------------------------- refused inputs


@pytest.mark.parametrize(
    ("name", "error", "fragment"),
    [
        ("CT_small.dcm", UnsupportedImageError, "Modality CT, BodyPartExamined not given: not a chest radiograph"),
        ("MR_small.dcm", UnsupportedImageError, "Modality MR"),
        ("US1_UNCR.dcm", UnsupportedImageError, "Modality US"),
        ("bad_sequence.dcm", UnsupportedImageError, "Modality CT, BodyPartExamined NECK"),
        ("emri_small.dcm", UnsupportedImageError, "Modality MR, BodyPartExamined HEAD"),
        ("rtplan.dcm", UnsupportedImageError, "no pixel data (RT Plan Storage"),
        ("SC_rgb_2frame.dcm", UnsupportedImageError, "2 frames"),
        ("SC_rgb_small_odd.dcm", UnsupportedImageError, "3 x 3 pixels is too small"),
    ],
)
def test_real_files_that_are_not_chest_radiographs_are_refused(name, error, fragment):
    with pytest.raises(error) as info:
        read_image(dcm_file(name))
    assert type(info.value) is error and fragment in str(info.value)


def test_mammogram_is_refused(cr_ds):
    with pytest.raises(UnsupportedImageError, match="Modality MG, BodyPartExamined BREAST"):
        read_image(variant(cr_ds, Modality="MG", BodyPartExamined="BREAST"))


@pytest.mark.parametrize(("name", "fraction"), [("RG1_UNCI.dcm", 0.5), ("RG1_J2KR.dcm", 0.5), ("RG1_UNCI.dcm", 0.0001)])
def test_truncated_copies_are_read_errors(tmp_path, name, fraction):
    data = Path(dcm_file(name)).read_bytes()
    path = tmp_path / f"cut_{name}"
    path.write_bytes(data[: max(int(len(data) * fraction), 700)])
    with pytest.raises(ImageReadError, match="truncated or corrupt") as info:
        read_image(path)
    assert type(info.value) is ImageReadError and str(path) in str(info.value)


def test_bytes_are_named_by_the_caller_or_as_an_upload():
    """Every message, down to the pixel decoder's, names the file the caller gives; bytes default to an upload."""
    data = Path(dcm_file("RG1_UNCI.dcm")).read_bytes()
    cut = data[: len(data) // 2]
    with pytest.raises(ImageReadError, match=r"^chest 1\.dcm: .*truncated or corrupt"):
        read_image(cut, name="chest 1.dcm")
    with pytest.raises(ImageReadError, match=r"^uploaded image: .*truncated or corrupt"):
        read_image(cut)
    with pytest.raises(ImageReadError, match=r"^scan\.png: the file is empty"):
        read_image(b"", name="scan.png")
    assert read_image(data, name="chest 1.dcm").meta == read_image(data).meta


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty \(0 bytes\)"):
        read_image(path)


def test_missing_path_directory_and_pipe_are_named(tmp_path):
    missing = tmp_path / "nope.dcm"
    with pytest.raises(ImageReadError, match=f"{missing}: no such file"):
        read_image(missing)
    with pytest.raises(ImageReadError, match="is a directory"):
        read_image(tmp_path)
    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_image(fifo)


def test_random_bytes_named_dcm(tmp_path):
    path = tmp_path / "random.dcm"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ImageReadError, match="not a DICOM, PNG or JPEG"):
        read_image(path)


def test_decompression_bomb_header_refused_before_decoding(cr_ds):
    # the pixel data is the original 1955 x 1841: decoding would fail with a read error, not a size error
    with pytest.raises(ImageTooLargeError, match="60000 x 60000"):
        read_image(variant(cr_ds, Rows=60000, Columns=60000))
    with pytest.raises(ImageTooLargeError, match="decompression bomb"):
        read_image(dcm_file("RG1_UNCI.dcm"), max_pixels=1_000_000)


def test_file_size_limit(monkeypatch, tmp_path, dev_images):
    monkeypatch.setattr(dicom, "MAX_FILE_BYTES", 1000)
    png = next(iter(sorted(dev_images.glob("*.png"))))
    with pytest.raises(ImageTooLargeError, match="MB limit"):
        read_image(png)
    with pytest.raises(ImageTooLargeError, match="MB limit"):
        read_image(png.read_bytes())


# ---------------------------------------------------------------- PNG / JPEG / bytes


def test_dev_png_reads_as_8bit_over_255(dev_images):
    png = sorted(dev_images.glob("*.png"))[0]
    img = read_image(png)
    expected = np.asarray(Image.open(png).convert("L"), dtype=np.float32) / 255.0
    np.testing.assert_array_equal(img.pixels, expected)
    assert (img.meta.source, img.meta.bits_stored, img.raw) == ("png", 8, None)
    assert (img.meta.rows, img.meta.columns) == img.pixels.shape


def test_png_named_dcm_reads_by_content(tmp_path, dev_images):
    png = sorted(dev_images.glob("*.png"))[0]
    fake = tmp_path / "really_a_png.dcm"
    fake.write_bytes(png.read_bytes())
    np.testing.assert_array_equal(read_image(fake).pixels, read_image(png).pixels)
    assert read_image(fake).meta.source == "png"


def test_16bit_png_keeps_its_precision(tmp_path):
    values = np.linspace(0, 65535, 200 * 300).round().astype(np.uint16).reshape(200, 300)
    path = tmp_path / "sixteen.png"
    Image.fromarray(values).save(path)
    img = read_image(path)
    assert img.meta.bits_stored == 16 and img.meta.source == "png"
    np.testing.assert_allclose(img.pixels, values / 65535.0, atol=1e-7)
    assert len(np.unique(img.pixels)) > 10_000  # an 8-bit path would leave at most 256 levels


def test_jpeg_and_colour_png(tmp_path):
    grey = np.tile(np.arange(256, dtype=np.uint8), (64, 1))
    path = tmp_path / "grey.jpg"
    Image.fromarray(grey).save(path, quality=95)
    img = read_image(path)
    assert img.meta.source == "jpeg" and np.abs(img.pixels - grey / 255.0).max() < 0.05
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0] = grey[:, :64]  # a red ramp (a uniform colour would be refused as "no anatomy")
    Image.fromarray(rgb).save(tmp_path / "red.png")
    red = read_image(tmp_path / "red.png")
    np.testing.assert_allclose(red.pixels, grey[:, :64] * 0.299 / 255.0, atol=1e-6)
    assert any("converted to grayscale" in w for w in red.meta.warnings)
    Image.fromarray(np.dstack([grey] * 3)).save(tmp_path / "grey_rgb.png")
    assert read_image(tmp_path / "grey_rgb.png").meta.warnings == ()  # R = G = B is not colour


def test_tiny_and_huge_png_refused(tmp_path):
    Image.fromarray(np.zeros((20, 300), np.uint8)).save(tmp_path / "strip.png")
    with pytest.raises(UnsupportedImageError, match="too small"):
        read_image(tmp_path / "strip.png")
    Image.fromarray(np.zeros((400, 400), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(ImageTooLargeError):
        read_image(tmp_path / "big.png", max_pixels=100_000)


def test_bytes_input_equals_path_input(cr):
    img = read_image(Path(dcm_file("RG1_UNCI.dcm")).read_bytes())
    np.testing.assert_array_equal(img.pixels, cr.pixels)
    assert img.meta == cr.meta


def test_dicom_without_preamble_or_file_meta(cr_ds):
    ds = pydicom.dcmread(dcm_file("CT_small.dcm"))
    ds.Modality = "DX"
    ds.preamble = None
    del ds.file_meta
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    img = read_image(buf.getvalue())
    assert img.meta.transfer_syntax == "1.2.840.10008.1.2" and img.pixels.shape == (128, 128)


# ---------------------------------------------------------------- metadata


def test_metadata_fields(cr, cr_ds):
    m = cr.meta
    assert (m.source, m.modality, m.body_part, m.view_position) == ("dicom", "CR", "CHEST", "PA")
    assert (m.bits_stored, m.rows, m.columns) == (15, 1955, 1841)
    assert m.transfer_syntax == "1.2.840.10008.1.2.1" and m.sop_instance_uid == cr_ds.SOPInstanceUID
    assert m.study_date == "20040826"
    # this file's PixelSpacing is 0\0: not a spacing, reported rather than used
    assert m.pixel_spacing is None and any("PixelSpacing" in w for w in m.warnings)


def test_imager_pixel_spacing_preferred_for_cr(cr_ds):
    both = read_image(variant(cr_ds, ImagerPixelSpacing=[0.143, 0.139], PixelSpacing=[0.2, 0.2])).meta
    assert (both.pixel_spacing, both.pixel_spacing_source) == ((0.143, 0.139), "ImagerPixelSpacing")
    only = read_image(variant(cr_ds, PixelSpacing=[0.2, 0.2])).meta
    assert (only.pixel_spacing, only.pixel_spacing_source) == ((0.2, 0.2), "PixelSpacing")
    ot = read_image(dcm_file("SC_rgb.dcm")).meta
    assert (ot.pixel_spacing, ot.pixel_spacing_source) == ((1.0, 1.0), "PixelSpacing")


def test_as_dict_is_json_safe_and_carries_no_patient_identifiers(cr_ds):
    data = variant(cr_ds, PatientName="Doe^Jane", PatientID="MRN-4815162342", PatientBirthDate="19700101")
    assert b"MRN-4815162342" in data  # the identifiers really are in the file
    meta = read_image(data).meta.as_dict()
    text = json.dumps(meta)
    for secret in ("Doe", "Jane", "MRN-4815162342", "19700101"):
        assert secret not in text
    assert not any("patient" in key.lower() for key in meta)
    assert json.loads(text)["modality"] == "CR" and json.loads(text)["warnings"] == list(meta["warnings"])


# ---------------------------------------------------------------- chest/frontal check


def test_lateral_is_readable_but_refused_by_check_chest_frontal(cr_ds):
    img = read_image(variant(cr_ds, ViewPosition="LL"))  # the app can still show it
    with pytest.raises(UnsupportedImageError, match="ViewPosition LL: a lateral"):
        check_chest_frontal(img.meta)


@pytest.mark.parametrize("view", ["LATERAL", "rl", "LAT "])
def test_lateral_view_spellings_refused(view):
    with pytest.raises(UnsupportedImageError, match="lateral"):
        check_chest_frontal(ImageMeta(source="dicom", rows=64, columns=64, view_position=view))


@pytest.mark.parametrize(
    ("body", "ok"),
    [
        ("CHEST", True),
        ("Thorax", True),
        ("LUNG", True),
        ("", True),
        (None, True),
        ("CHEST_PA", True),
        ("SKULL", False),
        ("EXTREMITY", False),
    ],
)
def test_body_part_check(body, ok):
    meta = ImageMeta(source="dicom", rows=64, columns=64, modality="CR", body_part=body, view_position="PA")
    if ok:
        check_chest_frontal(meta)
    else:
        with pytest.raises(UnsupportedImageError, match=f"BodyPartExamined {body}: not a chest radiograph"):
            check_chest_frontal(meta)


def test_real_extremity_cr_reads_but_is_not_a_chest():
    img = read_image(dcm_file("RG3_UNCI.dcm"))
    assert img.meta.body_part == "EXTREMITY"
    with pytest.raises(UnsupportedImageError, match="EXTREMITY"):
        check_chest_frontal(img.meta)
