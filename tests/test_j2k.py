"""Reduced-resolution JPEG 2000: the model input from the reduced decode matches full decode + resize."""

from __future__ import annotations

import hashlib
import io
import math
import os
import subprocess
import sys

import conftest
import numpy as np
import pydicom
import pytest
from _inference_run import make_tiny_run
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

from medvit.data.dicom import read_image
from medvit.data.j2k import MAX_LEVEL, THREADS_ENV, cod_segment, reduction_level
from medvit.data.transforms import build_transforms
from medvit.inference.predictor import Predictor

# Mean |difference| of the normalised model input (range about 4.4 after ImageNet normalisation): 0.02 is
# about one 8-bit grey level. With the area filter of new runs, RG1_J2KR at level 2 measured 0.014 at 384 px and
# 0.009 at 64 px; deeper levels go past it (medvit.data.j2k.MAX_LEVEL).
MEAN_INPUT_TOLERANCE = 0.02


def _input(pixels: np.ndarray, side: int) -> np.ndarray:
    prep = {"input_size": [3, side, side], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "interpolation": "bicubic", "antialias": True}
    return build_transforms(prep, train=False)(pixels).numpy()


@pytest.mark.parametrize(("rows", "cols", "side", "level"), [
    (1955, 1841, 384, 2),  # 489 x 461 (Pillow would size it 489 x 460: medvit declares the size)
    (800, 800, 384, 1),    # 400 >= 384; level 2 (200) is too small
    (2048, 2048, 64, MAX_LEVEL),  # capped where the input still matches the full decode
    (300, 300, 384, 0),    # already smaller than the model input: full decode
])
def test_reduction_level_is_the_coarsest_that_still_covers_the_input(rows, cols, side, level):
    assert reduction_level(rows, cols, side) == level
    if level:
        assert math.ceil(max(rows, cols) / 2**level) >= side


@pytest.mark.parametrize("side", [384, 64])
def test_reduced_decode_matches_full_decode_then_resize(side):
    path = conftest.testdata("RG1_J2KR.dcm")
    full = read_image(path)
    reduced = read_image(path, min_side=side)
    assert full.meta.decode_level == 0 and reduced.meta.decode_level == reduction_level(*full.pixels.shape, side) == 2
    assert reduced.pixels.shape == tuple(math.ceil(s / 2**reduced.meta.decode_level) for s in full.pixels.shape)
    assert (reduced.meta.rows, reduced.meta.columns) == reduced.pixels.shape
    assert reduced.meta.inverted == full.meta.inverted and reduced.meta.window_center == full.meta.window_center
    diff = np.abs(_input(reduced.pixels, side) - _input(full.pixels, side))
    assert diff.mean() <= MEAN_INPUT_TOLERANCE, diff.mean()
    # not trivially equal: the reduced decode really is a different (smaller) image
    assert reduced.pixels.size * 3 < full.pixels.size


@pytest.mark.parametrize(("resolutions", "level"), [(2, 1), (6, 2)])
def test_the_level_stops_at_the_codestreams_own_decomposition_levels(tmp_path, resolutions, level):
    """A codestream written with 1 wavelet level is decoded at level 1, not in full after a failed level 2."""
    ds = pydicom.dcmread(conftest.testdata("RG1_UNCI.dcm"))
    buf = io.BytesIO()  # OpenJPEG's own encoder (through Pillow), lossless
    Image.fromarray(ds.pixel_array.astype(np.uint16)).save(buf, format="JPEG2000", irreversible=False,
                                                            num_resolutions=resolutions, no_jp2=True)
    assert cod_segment(buf.getvalue())[9] == resolutions - 1
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    path = tmp_path / "j2k.dcm"
    ds.save_as(path, enforce_file_format=True)
    image = read_image(path, min_side=384)
    assert image.meta.decode_level == level
    assert image.pixels.shape == tuple(math.ceil(s / 2**level) for s in ds.pixel_array.shape)
    assert np.array_equal(read_image(path).pixels, read_image(conftest.testdata("RG1_UNCI.dcm")).pixels)


def test_uncompressed_files_ignore_min_side():
    path = conftest.testdata("RG1_UNCI.dcm")
    assert read_image(path, min_side=64).pixels.shape == read_image(path).pixels.shape


def test_findings_table_from_the_reduced_decode_matches_the_full_decode(tmp_path, dev_data):
    run = make_tiny_run(tmp_path / "run", dev_data)
    predictor = Predictor.from_dir(run, backend="torch")
    path = conftest.testdata("RG1_J2KR.dcm")
    full = predictor.predict(read_image(path)).table
    reduced = predictor.predict(read_image(path, min_side=predictor.input_side)).table
    assert np.abs(full["prob"] - reduced["prob"]).max() <= 0.02  # the engines' tolerance (AUTO_TOLERANCE)


def test_threaded_decode_gives_the_single_threaded_pixels():
    """OpenJPEG runs on OPJ_NUM_THREADS threads (set at import unless the user chose): the same pixels as one."""
    assert int(os.environ[THREADS_ENV]) >= 1
    path = conftest.testdata("RG1_J2KR.dcm")
    threaded = read_image(path, min_side=384)
    assert threaded.meta.decode_level >= 1
    script = ("import hashlib, sys; from medvit.data.dicom import read_image; "
              "p = read_image(sys.argv[1], min_side=384).pixels; "
              "print(p.shape, p.dtype, hashlib.sha256(p.tobytes()).hexdigest())")
    one = subprocess.run([sys.executable, "-c", script, str(path)], check=True, capture_output=True, text=True,
                         env={**os.environ, THREADS_ENV: "1"}, timeout=300).stdout.split("\n")[-2]
    p = np.ascontiguousarray(threaded.pixels)
    assert one == f"{p.shape} {p.dtype} {hashlib.sha256(p.tobytes()).hexdigest()}"
