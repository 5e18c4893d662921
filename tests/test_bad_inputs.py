"""Every input of the bad-input corpus, through every interface: the documented typed error, an actionable
message, no traceback, no hang. One parametrized row per input (the corpus is `tests/data/bad/make_corpus.py`).

Interfaces: the library (`read_image` + `check_chest_frontal` for images, `load_labels` for CSVs), the CLI
(`medvit predict FILE` / `medvit data check`: exit 2 and one line), `medvit predict FOLDER` (one error row per
bad file, the good file still predicted) and the review app (`st.error`).
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest

from medvit.cli import main as cli_main
from medvit.data.datasets import load_labels
from medvit.data.dicom import check_chest_frontal, read_image
from medvit.errors import MedvitError


def _corpus_module():
    path = Path(__file__).parent / "data" / "bad" / "make_corpus.py"
    spec = importlib.util.spec_from_file_location("medvit_bad_corpus", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


corpus = _corpus_module()
CASES = corpus.CASES
IMAGE_CASES = [c for c in CASES if c.kind == "image"]
LABEL_CASES = [c for c in CASES if c.kind == "labels"]
PER_CASE_TIMEOUT = 20  # generous (the slowest case takes ~0.1 s): a hang is what this catches, not slowness


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns while we write deliberately broken files
        return corpus.build(tmp_path_factory.mktemp("bad"))


def _library(case, path: Path):
    """The call a medvit caller makes for this kind of input; returns the warnings of an accepted image."""
    if case.kind == "image":
        image = read_image(path)
        check_chest_frontal(image.meta)  # what the predictor applies before scoring
        return image.meta.warnings
    load_labels(path, corpus.images_root(path), **case.kwargs)
    return ()


def _assert_one_line_error(err: str, case) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("error: ")
    assert case.fragment.lower() in lines[0].lower()
    assert "Traceback" not in err


def test_the_corpus_is_big_and_covers_the_issue_list():
    names = {c.name for c in CASES}
    assert len(CASES) >= 40
    assert len(names) == len(CASES)
    required = {
        "empty.dcm", "random.dcm", "truncated_pixels.dcm", "no_pixel_data.dcm", "wrong_syntax_jpeg.dcm",
        "multiframe_cr.dcm", "SC_rgb.dcm", "SC_ybr_full_uncompressed.dcm", "CT_small.dcm", "MR_small.dcm",
        "US1_UNCR.dcm", "mammogram.dcm", "lateral.dcm", "huge_header.dcm", "one_pixel.dcm", "png_named.dcm",
        "notes.txt", "study.zip", "missing_columns.csv", "unknown_finding.csv", "duplicate_ids.csv",
        "dotdot_path.csv",
    }  # fmt: skip
    assert required <= names, required - names
    # errors carry a fragment to check, except where any ImageReadError wording is acceptable
    assert all(c.expect is None or issubclass(c.expect, MedvitError) for c in CASES)


@pytest.mark.timeout(PER_CASE_TIMEOUT)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_library_gives_the_typed_error(case, bad_inputs):
    path = bad_inputs[case.name]
    if case.expect is None:
        found = _library(case, path)
        assert not case.fragment or any(case.fragment.lower() in w.lower() for w in found), found
        return
    with pytest.raises(MedvitError) as info:
        _library(case, path)
    assert type(info.value) is case.expect, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert case.fragment.lower() in message.lower()
    assert "\n" not in message.strip()  # one line a person can read
    if case.kind == "image" and path.name in message:
        assert str(path) in message  # the message names the file


@pytest.mark.timeout(PER_CASE_TIMEOUT)
@pytest.mark.parametrize("case", IMAGE_CASES, ids=lambda c: c.name)
def test_image_bytes_upload_gives_the_typed_error(case, bad_inputs):
    """The app passes uploads as bytes: the same error, and no file name to leak or rely on."""
    path = bad_inputs[case.name]
    if not path.is_file():
        pytest.skip("not a regular file: cannot be uploaded")
    if case.expect is None:
        read_image(path.read_bytes())
        return
    with pytest.raises(MedvitError) as info:
        image = read_image(path.read_bytes())
        check_chest_frontal(image.meta)
    assert type(info.value) is case.expect, f"{type(info.value).__name__}: {info.value}"


@pytest.mark.timeout(PER_CASE_TIMEOUT)
@pytest.mark.parametrize("case", LABEL_CASES, ids=lambda c: c.name)
def test_cli_data_check_exits_2_with_one_line(case, bad_inputs, capsys):
    path = bad_inputs[case.name]
    argv = ["data", "check", "--labels", str(path), "--images", str(corpus.images_root(path))]
    if "findings" in case.kwargs:
        argv += ["--findings", *case.kwargs["findings"]]
    code = cli_main(argv)
    out, err = capsys.readouterr()
    assert code == case.exit_code, (out, err)
    assert "Traceback" not in out + err
    if code == 2:
        _assert_one_line_error(err, case)
    elif code == 1:  # `data check` reports missing files in its summary rather than failing
        assert "missing image files: 1" in out
