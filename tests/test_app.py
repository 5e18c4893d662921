"""The review app through Streamlit's AppTest: real DICOMs, a tiny real run folder, a temp SQLite database."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from _inference_run import make_tiny_run
from conftest import free_port, stored_reviews
from conftest import testdata as dicom_path
from PIL import Image
from streamlit.testing.v1 import AppTest

from medvit._io import write_json
from medvit.findings import DEFAULT_FINDINGS
from medvit.resources import APP_SCRIPT

APP = Path(__file__).resolve().parents[1] / "apps" / "review.py"
TIMEOUT = 180


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = make_tiny_run(tmp_path_factory.mktemp("app") / "run")
    card = {f: {"auroc": 0.7 + i / 100, "auroc_ci": [0.6, 0.9], "ece": i / 100} for i, f in enumerate(DEFAULT_FINDINGS)}
    card["Mass"] = {"auroc": 0.55, "auroc_ci": [0.3, 0.8], "ece": 0.02}  # no skill shown: never flagged
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


def _metadata(at: AppTest) -> pd.Series:
    """The image metadata table (the patient-identifier table also has a "field" column, and comes first)."""
    from medvit.review.worklist import PATIENT_TAGS

    meta = next(d.value for d in at.dataframe
                if "field" in d.value.columns and not set(PATIENT_TAGS) & set(d.value["field"]))  # fmt: skip
    return meta.set_index("field")["value"]


def _rows(at: AppTest) -> list[str]:
    """The findings rows on screen, top to bottom (each row's inline verdict control is keyed by its finding)."""
    return [b.key.split("_", 2)[2] for b in at.button_group if b.key and b.key.startswith("lab_")]


def _show_all(at: AppTest) -> AppTest:
    at.toggle(key=_image_key(at, "all_")).set_value(True).run()
    _no_crash(at)
    return at


def _findings(at: AppTest) -> list[str] | None:
    """Every finding row after "Show all findings" (None when the page shows no findings)."""
    if not any(t.key and t.key.startswith("all_") for t in at.toggle):
        return None
    return _rows(_show_all(at))


def _image_key(at: AppTest, prefix: str) -> str:
    """The widget key `prefix` + the 12-hex image hash the app uses to reset per-image widgets."""
    keys = [w.key for kind in ("radio", "selectbox", "toggle", "button_group") for w in getattr(at, kind) if w.key]
    return next(k for k in keys if k.startswith(prefix))[: len(prefix) + 12]


def _errors(at: AppTest) -> str:
    return " | ".join(e.value for e in at.error)


def test_default_launch_shows_flagged_findings_first_and_greys_what_it_cannot_report(env, run_dir):
    from medvit.inference.predictor import Predictor
    from medvit.review.service import ReviewService, findings_table

    at = _app()
    assert not at.error, _errors(at)
    assert "not a diagnostic device" in at.warning[0].value
    service = ReviewService(Predictor.from_dir(run_dir, backend="torch"))
    table = findings_table(service.analyze(Path(dicom_path("RG1_UNCI.dcm")).read_bytes(), "a.dcm").prediction)
    flagged = table.loc[table["flag"], "finding"].tolist()
    assert 0 < len(flagged) < len(DEFAULT_FINDINGS)
    assert _rows(at) == flagged, "only the flagged findings at first, furthest past the threshold first"
    assert _findings(at) == table["finding"].tolist() and sorted(_rows(at)) == sorted(DEFAULT_FINDINGS)
    assert table["finding"].iloc[-1] == "Mass" and not table.set_index("finding").loc["Mass", "flag"]
    assert any("Mass not reported: no skill shown" in c.value for c in at.caption)
    auroc = 0.7 + DEFAULT_FINDINGS.index(flagged[0]) / 100
    assert any(m.value == f"AUROC {auroc:.2f}" for m in at.markdown), "each row shows its model-card AUROC"
    bars = [m.value for m in at.markdown if "threshold" in m.value and "calibrated probability" in m.value]
    row = table.iloc[0]
    assert f"{row['prob']:.3f} · threshold {row['threshold']:.3f}" in bars[0]  # one rounding: 3 decimals
    assert any("below its threshold" in c.value for c in at.caption)  # what a verdict means below threshold
    assert not any("Demo model" in c.value for c in at.sidebar.caption)
    meta = _metadata(at)
    assert meta["Modality"] == "CR" and meta["View position"] == "PA" and meta["Body part"] == "CHEST"


def test_patient_identifiers_are_masked_until_revealed_for_each_image(env, tmp_path):
    at = _app()
    ids = [d.value for d in at.dataframe if "field" in d.value and "PatientName" in d.value["field"].tolist()]
    assert ids and set(ids[0]["value"]) == {"•••••"}
    at.toggle(key=_image_key(at, "show_phi_")).set_value(True).run()
    _no_crash(at)
    ids = [d.value for d in at.dataframe if "field" in d.value and "PatientName" in d.value["field"].tolist()]
    assert "CompressedSamples^RG1" in ids[0]["value"].tolist()
    # another image: masked again, whatever was revealed before
    ds = pydicom.dcmread(dicom_path("RG1_UNCI.dcm"))
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    other = tmp_path / "other.dcm"
    ds.save_as(other)
    at.sidebar.file_uploader(key="upload").upload("other.dcm", other.read_bytes()).run()
    _no_crash(at)
    ids = [d.value for d in at.dataframe if "field" in d.value and "PatientName" in d.value["field"].tolist()]
    assert ids and set(ids[0]["value"]) == {"•••••"}


def test_uploaded_png_is_scored_and_keyed_by_hash(env, dev_images):
    png = sorted(dev_images.glob("*.png"))[0]
    at = _app()
    at.sidebar.file_uploader(key="upload").upload(png.name, png.read_bytes(), "image/png").run()
    _no_crash(at)
    assert not at.error, _errors(at)
    assert len(_findings(at)) == len(DEFAULT_FINDINGS)
    assert any("no DICOM header" in c.value for c in at.caption)
    assert _metadata(at)["Format"] == "PNG"


def test_injected_file_path(env, monkeypatch):
    monkeypatch.setenv("MEDVIT_FILE", dicom_path("RG1_J2KR.dcm"))  # JPEG 2000 lossless: needs the decoders
    at = _app()
    assert not at.error, _errors(at)
    assert len(_findings(at)) == len(DEFAULT_FINDINGS)
    assert "JPEG 2000" in _metadata(at)["Transfer syntax"]


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


def test_feedback_is_written_edited_and_read_back(env):
    at = _show_all(_app())
    key = _image_key(at, "lab_")
    at.button_group(key=f"{key}_Effusion").set_value("present")
    at.button_group(key=f"{key}_Mass").set_value("absent")
    at.button_group(key=f"{key}_Cardiomegaly").set_value("uncertain").run()
    at.text_input(key="reviewer").input("Dr Test")
    at.text_area(key=f"note_{key[4:]}").input("looks fine")
    at = at.button(key=f"save_{key[4:]}").click().run()
    _no_crash(at)
    assert not at.error, _errors(at)
    assert any("Saved review #1 (3 finding(s))" in s.value for s in at.success)

    [review] = stored_reviews(env)
    assert review.reviewer == "Dr Test" and review.note == "looks fine"
    assert review.labels == {"Effusion": "present", "Mass": "absent", "Cardiomegaly": None}
    flag = {f: s.flag for f, s in review.shown.items()}
    assert review.verdicts["Effusion"] == ("agree" if flag["Effusion"] else "disagree")
    assert review.verdicts["Mass"] == "agree" and flag["Mass"] is False  # not reported: shown unflagged
    assert review.image_uid == "1.3.6.1.4.1.5962.1.1.9.1.3.20040826185059.5457"
    assert len(review.shown) == len(DEFAULT_FINDINGS)
    assert review.model_name == "deit3_small_patch16_384" and len(review.weights_sha256) == 64

    at.button_group(key=f"{key}_Effusion").set_value("absent").run()  # the reader changes their mind
    at = at.button(key=f"save_{key[4:]}").click().run()
    assert any("Updated review #1" in s.value for s in at.success), [s.value for s in at.success]
    [review] = stored_reviews(env)
    assert review.labels["Effusion"] == "absent" and len(review.edits) == 1
    assert review.edits[0].verdicts["Effusion"] == ("agree" if flag["Effusion"] else "disagree")
    history = _frame(at, "verdict")
    assert history is not None and set(history["finding"]) == {"Effusion", "Mass", "Cardiomegaly"}
    assert any(b.label == "Download CSV" for b in at.get("download_button"))


def test_feedback_without_reviewer_is_refused_with_one_message(env):
    at = _app()
    key = _image_key(at, "lab_")
    at.button_group[0].set_value("present").run()
    at = at.button(key=f"save_{key[4:]}").click().run()
    assert "Review not saved: reviewer name is empty" in _errors(at)
    assert "not saved: review not saved" not in _errors(at).lower()
    assert stored_reviews(env) == []


def _viewer_args(at: AppTest) -> dict:
    """The JSON arguments the page passed to the viewer component (pixels travel apart, as bytes)."""
    import json

    (viewer,) = [e for e in at.get("component_instance") if "medvit_viewer" in e.proto.component_name]
    return json.loads(viewer.proto.json_args)


def test_saliency_overlays_render(env):
    from medvit.review.viewer import GRADCAM, ROLLOUT, SALIENCY_FINDING, SALIENCY_METHOD

    at = _app()
    assert _viewer_args(at)["legend"] is None  # off by default: the reader sees the image first
    at.selectbox(key=SALIENCY_METHOD).set_value(ROLLOUT).run()
    _no_crash(at)
    assert not at.error, _errors(at)
    assert _viewer_args(at)["legend"]["title"] == "Attention rollout · all findings"
    keys = {_viewer_args(at)["overlay_key"]}
    at.selectbox(key=SALIENCY_METHOD).set_value(GRADCAM).run()
    for finding in ("Effusion", "Cardiomegaly"):
        at.selectbox(key=SALIENCY_FINDING).set_value(finding).run()
        _no_crash(at)
        assert not at.error, _errors(at)
        assert _viewer_args(at)["legend"]["title"] == f"Grad-CAM · {finding}"
        keys.add(_viewer_args(at)["overlay_key"])
    assert len(keys) == 3, "each map must change the overlay"


def _sent_pixels(at: AppTest) -> int:
    """Bytes of pixels the page sent the viewer in its last run (0: none)."""
    (viewer,) = [e for e in at.get("component_instance") if "medvit_viewer" in e.proto.component_name]
    return sum(len(a.bytes) for a in viewer.proto.special_args if a.key == "pixels")


def test_pixels_travel_once_per_image(env):
    """Streamlit re-sends a component's arguments whole when one changes: the pixels go once per image, even when the
    page runs again before the viewer reports that it holds them (the engine check's rerun did, at every page open);
    a viewer that asks for them again (a new frame) gets them, once per request."""
    from medvit.review.viewer import ROLLOUT, SALIENCY_METHOD, VIEWER_KEY

    at = _app()
    key = _viewer_args(at)["image_key"]
    assert _sent_pixels(at) == 1955 * 1841 * 2  # RG1_UNCI, uint16
    at.run()  # a page run while the viewer is still loading them
    assert _sent_pixels(at) == 0 and _viewer_args(at)["image_key"] == key
    at.session_state[VIEWER_KEY] = {"image": None, "need": key}  # the frame lost them (remounted)
    at.run()
    assert _sent_pixels(at) == 1955 * 1841 * 2
    at.run()  # the same request is answered once
    assert _sent_pixels(at) == 0
    at.session_state[VIEWER_KEY] = {"image": key}  # what the frontend reports once it shows the image
    at.selectbox(key=SALIENCY_METHOD).set_value(ROLLOUT).run()
    _no_crash(at)
    assert _viewer_args(at)["legend"]["title"] == "Attention rollout · all findings" and _sent_pixels(at) == 0
    assert _viewer_args(at)["pixels"] is None
    at.session_state[VIEWER_KEY] = {"image": None, "need": key}  # a new frame without them
    at.run()
    assert _sent_pixels(at) == 1955 * 1841 * 2


def test_viewer_starts_at_the_dicom_voi(env):
    at = _app()
    args = _viewer_args(at)
    assert args["presets"][0] == {"key": "V", "label": "Header VOI", "center": 15000.0, "width": 30000.0}
    assert [p["key"] for p in args["presets"]] == ["V", "L", "M"]
    assert (args["rows"], args["columns"], args["dtype"], args["invert"]) == (1955, 1841, "uint16", True)
    assert not any(s.label in ("Window centre", "Window width") for s in at.slider)  # windowing is in the viewer


def test_zero_shot_without_clip_is_one_line(env, monkeypatch, tmp_path):
    at = _app()  # MEDVIT_CLIP unset: one line naming the variable and the docs, no toggle, no error
    [line] = [c.value for c in at.caption if "CLIP" in c.value]
    assert "MEDVIT_CLIP" in line and "docs/" in line and not any(t.key == "zs_on" for t in at.toggle)
    monkeypatch.setenv("MEDVIT_CLIP", f"open_clip:local-dir:{tmp_path / 'no-clip-here'}")
    at = _app()
    at.toggle(key="zs_on").set_value(True).run()
    _no_crash(at)
    [line] = [c.value for c in at.caption if "CLIP" in c.value and "could be loaded" in c.value]
    assert "docs/" in line and "Traceback" not in line and "\n" not in line
    assert not at.error and not at.info, _errors(at)


def test_zero_shot_with_a_local_clip_is_labelled_uncalibrated_and_survives_a_rerun(env, monkeypatch, tmp_path):
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
    assert all(p.endswith(" (uncalibrated)") for p in table["prob"])  # labelled where the number is
    assert sum(float(p.split()[0]) for p in table["prob"].iloc[:2]) == pytest.approx(1.0, abs=2e-3)
    assert "pneumothorax | no pneumothorax" in table["prompt"].tolist()
    _show_all(at)  # any other rerun (invert, verdicts...) keeps the results
    assert _frame(at, "calibration") is not None


def _queue(at: AppTest) -> pd.DataFrame:
    return next(d.value for d in at.sidebar.dataframe if "status" in d.value.columns)


def test_worklist_is_a_queue_with_status_and_refusals(env, monkeypatch, tmp_path, dev_images):
    folder = tmp_path / "worklist"
    folder.mkdir()
    for name in ("RG1_UNCI.dcm", "CT_small.dcm"):
        os.symlink(dicom_path(name), folder / name)
    png = sorted(dev_images.glob("*.png"))[0]
    os.symlink(png, folder / "b_nih.png")
    (folder / "readme.txt").write_text("not an image")
    monkeypatch.setenv("MEDVIT_WORKLIST", str(folder))
    at = _app()
    queue = _queue(at).set_index("file")
    assert queue.index.tolist() == ["CT_small.dcm", "RG1_UNCI.dcm", "b_nih.png", "readme.txt"]
    assert queue.loc["CT_small.dcm", "status"].startswith("⛔ refused: Modality CT")
    assert queue.loc["readme.txt", "status"] == "⛔ refused: not a DICOM, PNG or JPEG file"
    assert queue.loc["RG1_UNCI.dcm", "status"] == "○ unreviewed"
    assert "CT" in _errors(at) and _findings(at) is None  # the queue starts on its first item
    at = at.button(key="next_folder").click().run()
    _no_crash(at)
    assert not at.error, _errors(at)
    assert _rows(at) and _queue(at)[""].tolist()[1] == "▶"
    key = _image_key(at, "lab_")
    at.button_group[0].set_value("present")
    at.text_input(key="reviewer").input("Dr Queue")
    at = at.button(key=f"save_{key[4:]}").click().run()
    assert any("Saved review #1" in s.value for s in at.success)
    assert _queue(at).set_index("file").loc["RG1_UNCI.dcm", "status"] == "✓ reviewed"  # at once, not next click
    at = at.button(key="next_folder").click().run()
    assert _queue(at).set_index("file").loc["RG1_UNCI.dcm", "status"] == "✓ reviewed"
    assert any("no DICOM header" in c.value for c in at.caption)  # the PNG
    # an upload shows the uploaded file and keeps the queue; the queue's buttons take the reader back to it
    upload = tmp_path / "up.png"  # not a worklist file's bytes (those are cached under the worklist's names)
    Image.open(png).rotate(180).save(upload)
    at.sidebar.file_uploader(key="upload").upload("up.png", upload.read_bytes()).run()
    _no_crash(at)
    assert _queue(at) is not None and any("up.png" in c.value for c in at.caption)
    at = at.button(key="prev_folder").click().run()
    assert _queue(at)[""].tolist()[1] == "▶" and not any("up.png" in c.value for c in at.caption)


def test_first_table_comes_while_the_engine_self_check_still_runs(env, monkeypatch):
    """Backend `auto`: eager torch serves the first table at once; the engine choice (held on an Event here) runs in
    the background and its engine serves the next images once it is done."""
    import threading

    import streamlit as st

    from medvit.inference.predictor import Predictor

    real, release, checks = Predictor.from_dir.__func__, threading.Event(), []

    def from_dir(cls, run_dir=None, backend="auto"):
        if backend == "auto":  # the background check: wait, then "choose" a verified ONNX engine
            checks.append(threading.current_thread())
            assert release.wait(TIMEOUT)
            backend = "onnx"
        return real(cls, run_dir, backend)

    monkeypatch.setattr(Predictor, "from_dir", classmethod(from_dir))
    monkeypatch.delenv("MEDVIT_BACKEND")
    st.cache_resource.clear()  # a fresh service, as at a cold start
    try:
        at = _app()
        assert _rows(at) and not at.error, _errors(at)  # the table, while the check is still blocked
        assert any("backend torch" in c.value for c in at.sidebar.caption)
        assert any("engine: torch (checking the faster engines" in c.value for c in at.sidebar.caption)
        [check] = [t for t in threading.enumerate() if t.name == "medvit-engine-check"]
        assert check.is_alive()
        release.set()
        check.join(TIMEOUT)
        assert len(checks) == 1 and checks[0] is check
        at.sidebar.file_uploader(key="upload").upload("up.dcm", Path(dicom_path("RG1_UNCI.dcm")).read_bytes())
        at.run()
        _no_crash(at)
        assert any("backend onnx" in c.value for c in at.sidebar.caption)
        assert not any("checking" in c.value for c in at.sidebar.caption)
    finally:
        release.set()
        st.cache_resource.clear()


def test_the_server_warm_up_loads_the_service_the_first_page_run_uses(env, monkeypatch):
    """`medvit.review.launch.warm_up` (the server's thread, before any session) fills the page's own resource cache:
    the first page run (the packaged page script) draws the table with that service and loads no second one."""
    import streamlit as st

    from medvit.review.launch import warm_up
    from medvit.review.service import ReviewService

    real, loads = ReviewService.load.__func__, []
    monkeypatch.setattr(ReviewService, "load", classmethod(lambda cls, run=None: loads.append(run) or real(cls, run)))
    st.cache_resource.clear()  # a fresh server
    try:
        warm_up()
        assert loads == [os.environ["MEDVIT_RUN"]]
        at = AppTest.from_file(str(APP_SCRIPT), default_timeout=TIMEOUT).run()
        _no_crash(at)
        assert _rows(at) and not at.error, _errors(at)
        assert loads == [os.environ["MEDVIT_RUN"]], "the page loaded the model again"
    finally:
        st.cache_resource.clear()


def test_medvit_review_loads_the_model_in_the_server_before_any_session(run_dir, tmp_path):
    """The real `medvit review` process: its log says the model is loaded while no browser has connected (only the
    health endpoint is polled, which opens no session)."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    log = tmp_path / "server.log"
    env = dict(os.environ, MEDVIT_BACKEND="torch", MEDVIT_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "medvit", "review", "--run", str(run_dir), "--port", str(port), "--db",
           f"sqlite:///{tmp_path / 'reviews.sqlite3'}"]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline, healthy = time.monotonic() + TIMEOUT, False
        while "warm-up: model" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        try:
            with urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=5) as r:
                healthy = r.status == 200
        except OSError:
            pass
        text = log.read_text()
        assert "warm-up: model deit3_small_patch16_384 loaded in the server process" in text, text[-3000:]
        assert healthy and proc.poll() is None, text[-3000:]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_review_command_binds_localhost_and_passes_settings(run_dir, tmp_path):
    from medvit.cli import build_parser, main
    from medvit.commands.review import build_command

    args = build_parser("review").parse_args(["review", "--run", str(run_dir), "--worklist", str(tmp_path)])
    cmd, env = build_command(args)
    flags = dict(zip(cmd[5::2], cmd[6::2], strict=True))
    assert cmd[1:4] == ["-m", "medvit.review.launch", "run"] and cmd[4] == str(APP_SCRIPT)
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

    settings = AppSettings(
        run_dir=str(tmp_path / "run"),
        worklist=tmp_path,
        default_file=tmp_path / "a.dcm",
        max_upload_mb=7,
        db_url=f"sqlite:///{tmp_path / 'r.sqlite3'}",
    )
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


def test_fresh_launch_uses_the_demo_model(env, monkeypatch):
    """No --run, no MEDVIT_RUN: the packaged demo model on RG1_UNCI.dcm, as on a fresh machine."""
    from medvit.resources import DEMO_RUN

    if not (DEMO_RUN / "config.json").is_file():
        pytest.skip(f"the demo model is not in {DEMO_RUN} yet")
    monkeypatch.delenv("MEDVIT_RUN")
    at = _app()
    assert not at.error, _errors(at)
    shipped = f"hold-out mean AUROC {json.loads((DEMO_RUN / 'metrics.json').read_text())['mean_auroc']:.2f}"
    assert any("Demo model" in c.value and shipped in c.value for c in at.sidebar.caption)
    assert any("demo model" in i.value and "hold-out mean AUROC" in i.value for i in at.info)
    table = _findings(at)  # "Show all findings": unreported findings are not flagged, so they are hidden before
    assert table is not None and len(table) == len(DEFAULT_FINDINGS)
    assert any("Mass not reported: no skill shown" in c.value for c in at.caption)  # the fold-ensemble demo


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


# ---- the PACS worklist (issue 11), against a real Orthanc ----


@pytest.fixture
def pacs(tmp_path, monkeypatch):
    """A real Orthanc (tests/_orthanc.py: temp storage, authentication on, loopback only), stopped by its PID."""
    from _orthanc import running_orthanc

    yield from running_orthanc(tmp_path / "orthanc", monkeypatch)


def test_pacs_worklist_lists_scores_opens_and_stores_verdicts(env, pacs, monkeypatch, run_dir):
    from test_pacs import _copy, _srs

    from medvit.inference.predictor import Predictor
    from medvit.pacs.client import PacsClient
    from medvit.pacs.sr import read_sr_findings
    from medvit.pacs.watch import Watcher
    from medvit.review.store import ReviewStore

    unci, lateral, later = _copy("RG1_UNCI.dcm"), _copy("RG1_UNCI.dcm", ViewPosition="LL"), _copy("RG1_UNCI.dcm")
    for ds in (unci, lateral, later, pydicom.dcmread(dicom_path("CT_small.dcm"))):
        pacs.upload(ds)
    store = ReviewStore(env)  # the watcher scores two of the three CR instances into the app's database
    Watcher(PacsClient(pacs.dicomweb), Predictor.from_dir(run_dir, backend="torch"), store.engine).run_pass()
    store.close()
    pacs.upload(_copy("RG1_UNCI.dcm"))  # arrives after the watcher's pass: not scored yet
    monkeypatch.setenv("MEDVIT_DICOMWEB_URL", pacs.dicomweb)
    at = _app()
    assert not at.error, _errors(at)
    queue = _queue(at)
    assert len(queue) == 4 and "CT" not in set(queue["view"].dropna())  # CR/DX only
    statuses = queue["status"].tolist()
    assert statuses.count("✓ reviewed") == 0
    assert queue["top_finding"].iloc[0] is not None, "the most urgent scored study comes first"
    assert queue["top_prob"].dropna().is_monotonic_decreasing
    assert any(s.startswith("⛔ refused") and "lateral" in s for s in statuses)
    assert _rows(at), "the first study is retrieved and shown like any other image"
    assert (queue["date"] == "2004-08-26").all()

    key = _image_key(at, "lab_")
    at.button_group[0].set_value("present")
    at.text_input(key="reviewer").input("Dr PACS")
    at.checkbox(key="pacs_sr").check()
    at = at.button(key=f"save_{key[4:]}").click().run()
    _no_crash(at)
    assert not at.error, _errors(at)
    assert any("Stored your verdicts in the PACS" in s.value for s in at.success)
    reviewed = [sr for sr in _srs(pacs) if sr.SeriesDescription == "medvit findings with clinician verdicts"]
    assert len(reviewed) == 1
    verdicts = {f: v["verdict"] for f, v in read_sr_findings(reviewed[0]).items() if "verdict" in v}
    assert list(verdicts) == [_rows(at)[0]] and set(verdicts.values()) <= {"agree", "disagree"}
    at = at.button(key="next_pacs").click().run()
    assert _queue(at)["status"].tolist()[0] == "✓ reviewed"


def test_unreachable_pacs_is_one_clear_message(env, monkeypatch):
    monkeypatch.setenv("MEDVIT_DICOMWEB_URL", "http://127.0.0.1:9/dicom-web")
    at = _app()
    [message] = [e.value for e in at.error]
    assert "cannot be reached" in message and "Traceback" not in message
