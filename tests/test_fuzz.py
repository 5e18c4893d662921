"""Property-based fuzzing (hypothesis) of the two parsers that take files from outside: `read_image` and
`load_labels`. Inputs are real files (a real CR DICOM header, PNG, JPEG, an NIH-format CSV) with random
mutations: flipped and overwritten bytes, truncations, insertions, and (for CSVs) hostile cell values.

The properties: the parser returns a valid result or raises a `MedvitError`; any other exception is a
crash. Results must be sane (pixels finite in [0, 1] with the shape the metadata states; every image
path inside the image root). CI runs a bounded number of examples (about a minute in all); the long run
is `python benchmarks/fuzz.py`.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import bad_corpus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medvit.data.datasets import load_labels
from medvit.data.dicom import read_image
from medvit.errors import MedvitError

corpus = bad_corpus()
FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _small_dicom() -> bytes:
    """The real RG1_UNCI.dcm header with a 64 x 64 crop of its pixels: most mutations land in the header."""
    ds = corpus.small_cr()
    arr = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ds.Rows, ds.Columns)[64:128, 64:128].copy()
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = arr.tobytes()
    return corpus.dicom_bytes(ds)


def _png16() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(corpus.gradient(48, 48).astype(np.uint16) * 257).save(buf, format="PNG")
    return buf.getvalue()


SEEDS = {
    "dicom": _small_dicom(),
    "png": corpus.png_bytes(corpus.gradient(64, 64)),
    "png16": _png16(),
    "jpeg": corpus.jpeg_bytes(corpus.gradient(64, 64)),
}


@st.composite
def mutated(draw, seed: bytes, header_bias: int = 0) -> bytes:
    """`seed` after 1-8 random edits; with `header_bias`, most edits hit its first `header_bias` bytes."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        hi = min(len(data), header_bias) if header_bias and draw(st.booleans()) else len(data)
        pos = draw(st.integers(0, max(hi - 1, 0)))
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "repeat"]))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            chunk = draw(st.sampled_from([b"\x00", b"\xff", b"\xff\xff\xff\xff", b"\x7f\xff", b"\x80\x00\x00\x00"]))
            data[pos : pos + len(chunk)] = chunk
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        else:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 64))]
    return bytes(data)


def _check_image(data: bytes) -> None:
    """The property: a sane image or a MedvitError. Anything else propagates and fails the test as a crash."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns loudly on malformed headers; that is not a failure
        try:
            image = read_image(data)
        except MedvitError:
            return
    px = image.pixels
    assert px.dtype == np.float32 and px.ndim == 2
    assert px.shape == (image.meta.rows, image.meta.columns)
    assert np.isfinite(px).all() and px.min() >= 0.0 and px.max() <= 1.0
    image.meta.as_dict()  # JSON-safe metadata never fails


def test_seeds_are_valid_images():
    for name, seed in SEEDS.items():
        image = read_image(seed)
        assert image.pixels.shape[0] >= 32, name


@pytest.mark.timeout(120)
@settings(FUZZ, max_examples=400)
@given(data=mutated(SEEDS["dicom"], header_bias=1600))
def test_fuzz_read_image_dicom(data):
    _check_image(data)


@pytest.mark.timeout(120)
@settings(FUZZ, max_examples=120)
@given(name=st.sampled_from(["png", "png16", "jpeg"]), data=st.data())
def test_fuzz_read_image_png_jpeg(name, data):
    _check_image(data.draw(mutated(SEEDS[name], header_bias=120)))


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=60)
@given(data=st.binary(max_size=2048))
def test_fuzz_read_image_random_bytes(data):
    _check_image(data)


# ------------------------------------------------------------------------------------------- labels CSVs

_IMAGES = 3
_CELLS = ["img0.png", "img1.png", "../img0.png", "/etc/passwd", "images/../img1.png", "", "nan", "-1", "1", "0",
          "2", "1.0", "No Finding", "Effusion|Mass", "Effusion|", "|", "Pneumonitis", "Pleural Effusion", "train",
          "val", "calib", "TEST", "p1", "p1,p2", '"quoted, cell"', "\u00e9", "\x00", "=cmd|' /C calc'!A0",
          "1e309", "  Effusion  ", "effusion"]  # fmt: skip
_NIH = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,split\n" + "".join(
    f"img{i}.png,{lab},0,{i},50,M,PA,{split}\n"
    for i, (lab, split) in enumerate([("Effusion", "train"), ("No Finding", "val"), ("Mass|Nodule", "train")])
)
_WIDE = "Path,Patient ID,Effusion,Cardiomegaly,Pleural Effusion,No Finding\n" + "".join(
    f"img{i}.png,p{i},{a},{b},,\n" for i, (a, b) in enumerate([(1, 0), (0, -1), ("", 1)])
)


@pytest.fixture(scope="module")
def images_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("csvfuzz") / "images"
    root.mkdir()
    for i in range(_IMAGES):
        (root / f"img{i}.png").write_bytes(SEEDS["png"])
    return root


@st.composite
def hostile_csv(draw) -> bytes:
    """A real NIH or CheXpert-style CSV with cells replaced by hostile values, then byte-level mutations."""
    lines = [line.split(",") for line in draw(st.sampled_from([_NIH, _WIDE])).splitlines()]
    for _ in range(draw(st.integers(0, 6))):
        row = draw(st.integers(0, len(lines) - 1))
        col = draw(st.integers(0, len(lines[row]) - 1))
        lines[row][col] = draw(st.sampled_from(_CELLS) | st.text(max_size=12))
    text = "\n".join(",".join(cells) for cells in lines) + "\n"
    data = text.encode("utf-8", "surrogatepass")
    return draw(mutated(data)) if draw(st.booleans()) else data


def _check_labels(data: bytes, root: Path, uncertainty: str) -> None:
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        csv = Path(tmp) / "labels.csv"
        csv.write_bytes(data)
        try:
            df = load_labels(csv, root, uncertainty=uncertainty, check_files=False)
        except MedvitError:
            return
    assert {"image_id", "path", "patient_id", "view", "split"} <= set(df.columns)
    assert df["image_id"].is_unique
    for path in df["path"]:
        assert Path(path).resolve().is_relative_to(root.resolve()), f"{path} escapes {root}"
    labels = df.drop(columns=["image_id", "path", "patient_id", "view", "split"]).to_numpy(dtype=float)
    assert np.isin(labels[~np.isnan(labels)], (0.0, 1.0)).all()


@pytest.mark.timeout(120)
@settings(FUZZ, max_examples=120)
@given(data=hostile_csv(), uncertainty=st.sampled_from(["ignore", "ones", "zeros"]))
def test_fuzz_load_labels(data, uncertainty, images_root):
    _check_labels(data, images_root, uncertainty)
