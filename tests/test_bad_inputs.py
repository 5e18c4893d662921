"""Every input of the bad-input corpus, through every interface: the documented typed error, an actionable
message, no traceback, no hang. One parametrized row per input (the corpus is `tests/data/bad/make_corpus.py`).

Interfaces: the library (`read_image` + `check_chest_frontal` for images, `load_labels` for CSVs), the CLI
(`medvit predict FILE` / `medvit data check`: exit 2 and one line), `medvit predict FOLDER` (one error row per
bad file, the good file still predicted) and the review app (`st.error`).
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import pytest
from conftest import bad_corpus

from medvit.cli import main as cli_main
from medvit.data.datasets import load_labels
from medvit.data.dicom import check_chest_frontal, read_image
from medvit.errors import MedvitError

corpus = bad_corpus()
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


@pytest.mark.timeout(PER_CASE_TIMEOUT, func_only=True)
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


@pytest.mark.timeout(PER_CASE_TIMEOUT, func_only=True)
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


@pytest.mark.timeout(PER_CASE_TIMEOUT, func_only=True)
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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny random-init DeiT3 run folder written through the real checkpoint code."""
    from _inference_run import make_tiny_run

    return make_tiny_run(tmp_path_factory.mktemp("run") / "run")


def _predict_argv(run: Path, *inputs: Path) -> list[str]:
    return ["predict", "--run", str(run), "--backend", "torch", "--workers", "0", *map(str, inputs)]


@pytest.mark.timeout(PER_CASE_TIMEOUT, func_only=True)
@pytest.mark.parametrize("case", IMAGE_CASES, ids=lambda c: c.name)
def test_cli_predict_one_file_exits_2_with_one_line(case, bad_inputs, tiny_run, capsys):
    code = cli_main(_predict_argv(tiny_run, bad_inputs[case.name]))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == case.exit_code, (out, err)
    if code == 2:
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, err
        assert (case.cli_fragment or case.fragment).lower() in errors[0].lower()


@pytest.mark.timeout(120, func_only=True)
def test_cli_predict_folder_records_an_error_row_per_file_and_goes_on(bad_inputs, tiny_run, tmp_path, capsys):
    """The whole image corpus plus one good radiograph in one folder: one error row per bad image file,
    the good files predicted, files that are not images (by name) left out, the run never stopped."""
    import pandas as pd

    folder = tmp_path / "inbox"
    folder.mkdir()
    for case in IMAGE_CASES:
        src = bad_inputs[case.name]
        if src.is_file():
            shutil.copy(src, folder / case.name)
    (folder / "good.dcm").write_bytes(corpus.dicom_bytes(corpus.small_cr()))
    out_csv = tmp_path / "preds.csv"

    code = cli_main([*_predict_argv(tiny_run, folder), "--out", str(out_csv)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in out + err
    rows = pd.read_csv(out_csv, keep_default_na=False)
    by_file = {Path(f).name: g for f, g in rows.groupby("file")}

    good = by_file.pop("good.dcm")
    assert (good["error"] == "").all() and len(good) == len(good["finding"].unique()) >= 14
    assert good["prob"].astype(float).between(0, 1).all()
    picked = {".dcm", ".png", ".jpg", ".jpeg"}
    for case in IMAGE_CASES:
        if not (folder / case.name).is_file() or Path(case.name).suffix not in picked:
            assert case.name not in by_file  # not an image by name: left out, as find_images documents
            continue
        table = by_file.pop(case.name)
        if case.expect is None:
            assert (table["error"] == "").all(), table["error"].iloc[0]
        else:
            assert len(table) == 1, f"{case.name}: predicted, expected an error row"
            assert case.fragment.lower() in table["error"].iloc[0].lower(), table["error"].iloc[0]
    assert not by_file  # nothing unexpected


APP = Path(__file__).resolve().parents[1] / "apps" / "review.py"
UPLOADABLE = [c for c in IMAGE_CASES if c.name not in ("a_folder.dcm", "named_pipe.dcm")]  # not regular files


@pytest.fixture(scope="module")
def app(tiny_run, tmp_path_factory):
    """One review app session (AppTest), reused: each case uploads its file and reruns the script."""
    from streamlit.testing.v1 import AppTest

    with pytest.MonkeyPatch.context() as mp:
        for name in ("MEDVIT_FILE", "MEDVIT_WORKLIST", "MEDVIT_CLIP", "MEDVIT_MAX_UPLOAD_MB"):
            mp.delenv(name, raising=False)
        mp.setenv("MEDVIT_RUN", str(tiny_run))
        mp.setenv("MEDVIT_BACKEND", "torch")
        mp.setenv("MEDVIT_DB_URL", f"sqlite:///{tmp_path_factory.mktemp('db') / 'reviews.sqlite3'}")
        at = AppTest.from_file(str(APP), default_timeout=180).run()
        assert not at.exception, [e.value for e in at.exception]
        yield at


@pytest.mark.timeout(PER_CASE_TIMEOUT * 3, func_only=True)
@pytest.mark.parametrize("case", UPLOADABLE, ids=lambda c: c.name)
def test_app_upload_shows_st_error_and_no_numbers(case, bad_inputs, app):
    app.sidebar.file_uploader(key="upload").upload(case.name, bad_inputs[case.name].read_bytes()).run()
    assert not app.exception, [e.value for e in app.exception]  # no traceback on the page
    errors = " | ".join(e.value for e in app.error)
    # the findings list: one inline verdict control per finding row
    findings = [b.key for b in app.button_group if b.key and b.key.startswith("lab_")]
    if case.expect is None:
        assert not errors and findings
        return
    assert errors, f"{case.name}: no st.error"
    assert case.fragment.lower() in errors.lower(), errors
    assert not re.search(r": unexpected \w+;", errors), errors  # a typed error, not the catch-all
    assert not findings
