"""The review app through Streamlit's AppTest: real DICOMs, a tiny real run folder, a temp SQLite database."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from _inference_run import make_tiny_run
from conftest import stored_reviews
from conftest import testdata as dicom_path
from streamlit.testing.v1 import AppTest

from medvit._io import write_json
from medvit.findings import DEFAULT_FINDINGS
from medvit.resources import APP_SCRIPT

APP = Path(__file__).resolve().parents[1] / "apps" / "review.py"
TIMEOUT = 180


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = make_tiny_run(tmp_path_factory.mktemp("app") / "run")
    card = {f: {"auroc": 0.5 + i / 100, "ece": 0.01 * i} for i, f in enumerate(DEFAULT_FINDINGS)}
    write_json(run / "metrics.json", {"n_images": 10, "findings": card})
    return run


@pytest.fixture
def env(monkeypatch, tmp_path, run_dir) -> str:
    db = f"sqlite:///{tmp_path / 'reviews.sqlite3'}"
    for name in ("MEDVIT_FILE", "MEDVIT_WORKLIST", "MEDVIT_CLIP", "MEDVIT_MAX_UPLOAD_MB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MEDVIT_RUN", str(run_dir))
    monkeypatch.setenv("MEDVIT_BACKEND", "torch")
    monkeypatch.setenv("MEDVIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MEDVIT_DB_URL", db)
    return db


def _app() -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    _no_crash(at)
    return at


def _no_crash(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _frame(at: AppTest, column: str) -> pd.DataFrame | None:
    return next((d.value for d in at.dataframe if column in d.value.columns), None)


def _findings(at: AppTest) -> pd.DataFrame | None:
    return _frame(at, "probability (calibrated)")


def _image_key(at: AppTest, prefix: str) -> str:
    """The widget key `prefix` + the 12-hex image hash the app uses to reset per-image widgets."""
    keys = [w.key for kind in ("radio", "selectbox", "toggle") for w in getattr(at, kind) if w.key]
    return next(k for k in keys if k.startswith(prefix))[: len(prefix) + 12]


def _errors(at: AppTest) -> str:
    return " | ".join(e.value for e in at.error)


def test_default_launch_shows_one_row_per_finding(env):
    at = _app()
    assert not at.error, _errors(at)
    assert "not a diagnostic device" in at.warning[0].value
    table = _findings(at)
    assert table is not None
    assert sorted(table["finding"]) == sorted(DEFAULT_FINDINGS)
    margins = (table["probability (calibrated)"] - table["threshold"]).to_numpy()
    assert all(margins[:-1] >= margins[1:]), "rows must be sorted by margin past the threshold"
    assert set(table["flag"]) <= {"above", "below"}
    assert (table["flag"] == "above").tolist() == list(margins >= 0)
    assert table.set_index("finding").loc["Effusion", "model card AUROC"] == pytest.approx(
        0.5 + DEFAULT_FINDINGS.index("Effusion") / 100
    )
    meta = _frame(at, "field").set_index("field")["value"]
    assert meta["Modality"] == "CR" and meta["View position"] == "PA" and meta["Body part"] == "CHEST"
    assert "Explicit VR Little Endian" in meta["Transfer syntax"]
    assert meta["Pixel spacing"] == "not given"  # RG1_UNCI's PixelSpacing is 0\0, which the reader refuses
    assert any("PixelSpacing" in c.value for c in at.caption)


def test_patient_identifiers_are_masked_until_revealed(env):
    at = _app()
    ids = [d.value for d in at.dataframe if "field" in d.value and "PatientName" in d.value["field"].tolist()]
    assert ids and set(ids[0]["value"]) == {"•••••"}
    at.toggle(key="show_phi").set_value(True).run()
    _no_crash(at)
    ids = [d.value for d in at.dataframe if "field" in d.value and "PatientName" in d.value["field"].tolist()]
    assert "CompressedSamples^RG1" in ids[0]["value"].tolist()


def test_uploaded_png_is_scored_and_keyed_by_hash(env, dev_images):
    png = sorted(dev_images.glob("*.png"))[0]
    at = _app()
    at.sidebar.file_uploader(key="upload").upload(png.name, png.read_bytes(), "image/png").run()
    _no_crash(at)
    assert not at.error, _errors(at)
    assert len(_findings(at)) == len(DEFAULT_FINDINGS)
    assert any("no DICOM header" in c.value for c in at.caption)
    assert _frame(at, "field").set_index("field")["value"]["Format"] == "PNG"


def test_injected_file_path(env, monkeypatch):
    monkeypatch.setenv("MEDVIT_FILE", dicom_path("RG1_J2KR.dcm"))  # JPEG 2000 lossless: needs the decoders
    at = _app()
    assert not at.error, _errors(at)
    assert len(_findings(at)) == len(DEFAULT_FINDINGS)
    assert "JPEG 2000" in _frame(at, "field").set_index("field")["value"]["Transfer syntax"]


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("empty.dcm", b"", "empty"),
        ("notes.dcm", b"this is a text file, not an X-ray" * 10, "not a DICOM, PNG or JPEG"),
        ("truncated.dcm", "RG1_UNCI.dcm", "truncated|corrupt|incomplete|ends"),
        ("CT_small.dcm", "CT_small.dcm", "CT"),
        ("image.png", "CT_small.dcm", "CT"),  # wrong extension: the content decides, and it is refused
    ],
)
def test_bad_files_show_an_error_and_no_numbers(env, name, data, message):
    import re

    if isinstance(data, str):
        raw = Path(dicom_path(data)).read_bytes()
        data = raw[: len(raw) // 2] if name.startswith("truncated") else raw
    at = _app()
    at.sidebar.file_uploader(key="upload").upload(name, data).run()
    _no_crash(at)
    assert at.error, "a bad file must produce st.error"
    assert re.search(message, _errors(at), re.I), _errors(at)
    assert name in _errors(at)
    assert _findings(at) is None


def test_oversized_upload_is_refused_with_the_limit(env, monkeypatch):
    monkeypatch.setenv("MEDVIT_MAX_UPLOAD_MB", "1")
    at = _app()
    at.sidebar.file_uploader(key="upload").upload("big.dcm", Path(dicom_path("RG1_UNCI.dcm")).read_bytes()).run()
    _no_crash(at)
    assert "upload limit of 1 MB" in _errors(at)
    assert _findings(at) is None


def test_non_chest_and_lateral_inputs_are_refused(env, tmp_path, monkeypatch):
    at = _app()
    at.sidebar.file_uploader(key="upload").upload("RG3_UNCI.dcm", Path(dicom_path("RG3_UNCI.dcm")).read_bytes()).run()
    _no_crash(at)
    assert "EXTREMITY" in _errors(at) and "Not scored" in _errors(at)
    assert _findings(at) is None

    ds = pydicom.dcmread(dicom_path("RG1_UNCI.dcm"))
    ds.ViewPosition = "LL"
    lateral = tmp_path / "lateral.dcm"
    ds.save_as(lateral)
    monkeypatch.setenv("MEDVIT_FILE", str(lateral))
    at = _app()
    assert "lateral" in _errors(at) and _findings(at) is None


def test_feedback_is_written_and_read_back(env):
    at = _app()
    table = _findings(at)
    key = _image_key(at, "v_")
    at.radio(key=f"{key}_Effusion").set_value("agree")
    at.radio(key=f"{key}_Cardiomegaly").set_value("disagree")
    at.text_input(key="reviewer").input("Dr Test")
    at.text_area(key=f"note_{key[2:]}").input("looks fine")
    at = next(b for b in at.button if b.label == "Save review").click().run()
    _no_crash(at)
    assert not at.error, _errors(at)
    assert any("Saved review #1" in s.value for s in at.success)

    [review] = stored_reviews(env)
    assert review.reviewer == "Dr Test" and review.note == "looks fine"
    assert review.verdicts == {"Effusion": "agree", "Cardiomegaly": "disagree"}
    assert review.image_uid == "1.3.6.1.4.1.5962.1.1.9.1.3.20040826185059.5457"
    shown = table.set_index("finding")
    assert review.shown["Effusion"].prob == pytest.approx(shown.loc["Effusion", "probability (calibrated)"])
    assert review.shown["Effusion"].threshold == pytest.approx(shown.loc["Effusion", "threshold"])
    assert len(review.shown) == len(DEFAULT_FINDINGS)
    assert review.model_name == "deit3_small_patch16_384" and len(review.weights_sha256) == 64

    history = _frame(at, "verdict")
    assert history is not None and set(history["finding"]) == {"Effusion", "Cardiomegaly"}
    assert any(b.label == "Download CSV" for b in at.get("download_button"))


def test_feedback_without_reviewer_is_refused(env):
    at = _app()
    key = _image_key(at, "v_")
    at.radio(key=f"{key}_Effusion").set_value("agree")
    at = next(b for b in at.button if b.label == "Save review").click().run()
    assert "reviewer name is empty" in _errors(at)
    assert stored_reviews(env) == []


def _image_url(at: AppTest) -> str:
    """The media URL of the displayed image; it is derived from the image's bytes, so it changes with them."""
    return at.get("image")[0].proto.imgs[0].url


def test_saliency_overlays_render(env):
    at = _app()
    plain = _image_url(at)
    sal = _image_key(at, "sal_")
    at.selectbox(key=sal).set_value("Attention rollout").run()
    _no_crash(at)
    assert not at.error, _errors(at)
    rollout = _image_url(at)
    at.selectbox(key=sal).set_value("Grad-CAM (one finding)").run()
    urls = {}
    for finding in ("Effusion", "Cardiomegaly"):
        at.selectbox(key=f"salf_{sal[4:]}").set_value(finding).run()
        _no_crash(at)
        assert not at.error, _errors(at)
        urls[finding] = _image_url(at)
    assert len({plain, rollout, *urls.values()}) == 4, "each overlay must change the displayed image"
    at.slider(key=f"alpha_{sal[4:]}").set_value(0.9).run()
    assert _image_url(at) != urls["Cardiomegaly"]  # the opacity slider re-blends


def test_window_sliders_default_to_the_dicom_voi(env):
    at = _app()
    wc = next(s for s in at.slider if s.label == "Window centre")
    ww = next(s for s in at.slider if s.label == "Window width")
    assert (wc.value, ww.value) == (15000.0, 30000.0)  # RG1_UNCI's WindowCenter / WindowWidth
    default = _image_url(at)
    wc.set_value(9000.0).run()
    narrowed = _image_url(at)
    at.toggle(key=_image_key(at, "inv_")).set_value(True).run()
    _no_crash(at)
    assert not at.error, _errors(at)
    assert len({default, narrowed, _image_url(at)}) == 3


def test_zero_shot_without_clip_explains_what_to_configure(env, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDVIT_CLIP", f"open_clip:local-dir:{tmp_path / 'no-clip-here'}")
    at = _app()
    at.toggle(key="zs_on").set_value(True).run()
    _no_crash(at)
    assert any("MEDVIT_CLIP" in i.value for i in at.info)
    assert not at.error, _errors(at)


def test_zero_shot_with_a_local_clip_is_labelled_uncalibrated(env, monkeypatch, tmp_path):
    from test_zeroshot import make_open_clip_dir

    monkeypatch.setenv("MEDVIT_CLIP", f"open_clip:local-dir:{make_open_clip_dir(tmp_path / 'clip')}")
    at = _app()
    at.toggle(key="zs_on").set_value(True).run()
    at.text_area(key="zs_prompts").input("pleural effusion\nnormal chest")
    at.text_area(key="zs_pairs").input("cardiomegaly | normal heart size\npneumothorax")
    at = next(b for b in at.button if b.label == "Score prompts").click().run()
    _no_crash(at)
    assert not at.error, _errors(at)
    table = _frame(at, "calibration")
    assert len(table) == 4 and set(table["calibration"]) == {"uncalibrated"}
    assert table["prob"].iloc[:2].sum() == pytest.approx(1.0, abs=1e-5)
    assert "pneumothorax | no pneumothorax" in table["prompt"].tolist()


def test_worklist_lists_files_and_opens_one(env, monkeypatch, tmp_path):
    folder = tmp_path / "worklist"
    folder.mkdir()
    for name in ("RG1_UNCI.dcm", "CT_small.dcm"):
        os.symlink(dicom_path(name), folder / name)
    (folder / "readme.txt").write_text("not an image")
    monkeypatch.setenv("MEDVIT_WORKLIST", str(folder))
    at = _app()
    listing = _frame(at, "modality")
    assert listing["file"].tolist() == ["CT_small.dcm", "RG1_UNCI.dcm"]
    row = listing.set_index("file").loc["RG1_UNCI.dcm"]
    assert (row["modality"], row["view"], row["date"]) == ("CR", "PA", "2004-08-26")
    at.sidebar.selectbox(key="worklist_choice").set_value("CT_small.dcm").run()
    _no_crash(at)
    assert "CT" in _errors(at) and _findings(at) is None


def test_review_command_binds_localhost_and_passes_settings(run_dir, tmp_path):
    from medvit.cli import build_parser, main
    from medvit.commands.review import build_command

    args = build_parser("review").parse_args(["review", "--run", str(run_dir), "--worklist", str(tmp_path)])
    cmd, env = build_command(args)
    flags = dict(zip(cmd[5::2], cmd[6::2], strict=True))
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == str(APP_SCRIPT)
    assert flags["--server.address"] == "localhost" and flags["--server.maxUploadSize"] == "64"
    assert flags["--client.showErrorDetails"] == "none"
    assert env["MEDVIT_RUN"] == str(run_dir.resolve()) and env["MEDVIT_WORKLIST"] == str(tmp_path.resolve())
    assert env["MEDVIT_MAX_UPLOAD_MB"] == "64"
    assert main(["review", "--run", str(tmp_path / "missing")]) == 2
    assert main(["review", "--port", "70000"]) == 2


def test_app_settings_travel_through_the_environment_unchanged(tmp_path):
    """`medvit review` writes the settings with to_env and the page reads them with from_env: one contract."""
    from medvit.errors import MedvitError
    from medvit.review.settings import DEFAULT_MAX_UPLOAD_MB, AppSettings, app_environment

    settings = AppSettings(run_dir=str(tmp_path / "run"), worklist=tmp_path, default_file=tmp_path / "a.dcm",
                           max_upload_mb=7, db_url=f"sqlite:///{tmp_path / 'r.sqlite3'}")
    env = settings.to_env()
    assert AppSettings.from_env(env) == settings
    assert env["MEDVIT_RUN"] == str(tmp_path / "run") and env["MEDVIT_MAX_UPLOAD_MB"] == "7"
    bare = AppSettings.from_env({})  # nothing set: the demo model, the default limit, the packaged example
    assert (bare.run_dir, bare.worklist, bare.max_upload_mb, bare.db_url) == (None, None, DEFAULT_MAX_UPLOAD_MB, None)
    for bad in ("lots", "0"):
        with pytest.raises(MedvitError, match="MEDVIT_MAX_UPLOAD_MB"):
            AppSettings.from_env({"MEDVIT_MAX_UPLOAD_MB": bad})
    launched = app_environment(settings, {"HF_HUB_OFFLINE": "0", "MEDVIT_RUN": "elsewhere"})
    assert launched["HF_HUB_OFFLINE"] == "0" and launched["TRANSFORMERS_OFFLINE"] == "1"  # the user's choice wins
    assert launched["MEDVIT_RUN"] == str(tmp_path / "run")  # the flag wins over the inherited environment


# ---- the library behind the app (medvit.review_service), without Streamlit ----


@pytest.fixture(scope="module")
def service(run_dir):
    from medvit.inference.predictor import Predictor
    from medvit.review.service import ReviewService

    return ReviewService(Predictor.from_dir(run_dir, backend="torch"))


def test_analysis_is_cached_by_file_hash(service, monkeypatch):
    data = Path(dicom_path("RG1_UNCI.dcm")).read_bytes()
    calls = []
    real = service.predictor.predict
    monkeypatch.setattr(service.predictor, "predict", lambda image: calls.append(1) or real(image))
    first = service.analyze(data, "a.dcm")
    assert service.analyze(data, "renamed.dcm") is first and len(calls) == 1
    assert set(first.timings_ms) >= {"decode", "preprocess", "forward", "calibrate", "overhead", "total"}
    assert first.image_uid_kind == "sop_instance_uid"
    shown = first.shown()
    assert set(shown) == set(DEFAULT_FINDINGS)
    row = first.prediction.table.set_index("finding").loc["Effusion"]
    assert (shown["Effusion"].prob, shown["Effusion"].threshold) == (row["prob"], row["threshold"])


def test_reader_errors_name_the_file(service):
    from medvit.errors import ImageReadError

    with pytest.raises(ImageReadError, match=r"^notes\.txt: not a DICOM, PNG or JPEG"):
        service.analyze(b"plain text, no image" * 5, "notes.txt")
    cut = Path(dicom_path("RG1_UNCI.dcm")).read_bytes()[:20_000]  # fails deep in the DICOM reader
    with pytest.raises(ImageReadError, match=r"^cut\.dcm: ") as info:
        service.analyze(cut, "cut.dcm")
    assert "uploaded image" not in str(info.value)


def test_windowing_defaults_reproduce_the_reader_and_rewindow_raw(service):
    import numpy as np

    from medvit.data.dicom import apply_window, read_image
    from medvit.review.display import display_pixels, downscale, window_defaults

    image = read_image(dicom_path("RG1_UNCI.dcm"))
    d = window_defaults(image)
    assert (d.center, d.width, d.base_invert) == (15000.0, 30000.0, True)
    np.testing.assert_array_equal(display_pixels(image, d.center, d.width, False), downscale(image.pixels, 1024))
    np.testing.assert_allclose(display_pixels(image, d.center, d.width, True), 1 - downscale(image.pixels, 1024),
                               atol=1e-6)  # fmt: skip
    narrow = display_pixels(image, 12000.0, 4000.0, False)
    expected = downscale(apply_window(image.raw, 12000.0, 4000.0, invert=True), 1024)
    np.testing.assert_allclose(narrow, expected, atol=1e-6)
    assert max(narrow.shape) == 1024 and not np.allclose(narrow, display_pixels(image, d.center, d.width, False))


def test_fresh_launch_uses_the_demo_model(env, monkeypatch):
    """No --run, no MEDVIT_RUN: the packaged demo model on RG1_UNCI.dcm, as on a fresh machine."""
    from medvit.resources import DEMO_RUN

    if not (DEMO_RUN / "config.json").is_file():
        pytest.skip(f"the demo model is not in {DEMO_RUN} yet")
    monkeypatch.delenv("MEDVIT_RUN")
    at = _app()
    assert not at.error, _errors(at)
    table = _findings(at)
    assert table is not None and len(table) == len(DEFAULT_FINDINGS)


def test_unexpected_failures_are_logged_and_shown_without_a_traceback(env, monkeypatch, caplog):
    from medvit.review.service import ReviewService

    def broken(self, data, name, **kw):
        raise RuntimeError("boom in a library bug")

    monkeypatch.setattr(ReviewService, "analyze", broken)
    at = _app()
    assert "unexpected RuntimeError; the details are in the server log" in _errors(at)
    assert "boom" not in _errors(at) and "Traceback" not in _errors(at)
    assert _findings(at) is None
    assert any(r.exc_info and "boom in a library bug" in str(r.exc_info[1]) for r in caplog.records)
