"""The review app's image viewer in a real browser: zoom, mouse-drag window/level, presets and reset, lossy marking,
and the saliency layer with its colour scale. One real `medvit review` server for both tests (_server.server).

The viewer is a Cornerstone3D component in an iframe; its readouts carry the numbers the tests compare
(`data-width`/`data-center` in the image's units, `data-scale` in screen pixels per image pixel).
Screenshots go to $MEDVIT_ARTIFACT_DIR.
"""

from __future__ import annotations

import re
from pathlib import Path

import pydicom
import pytest
from _server import RESULT_MS, artifact_dir, launch, shared_server, upload  # noqa: F401 - the `server` fixture
from conftest import testdata as dicom_path

pytestmark = pytest.mark.e2e

VIEWER = 'iframe[title*="medvit_viewer"]'


def _open(page, url: str, file: str):
    """Upload `file` and wait until the viewer shows it; returns the viewer's frame."""
    from playwright.sync_api import expect

    page.goto(url)
    expect(page.get_by_text("not a diagnostic device")).to_be_visible(timeout=RESULT_MS)
    upload(page, file)
    expect(page.get_by_text(f"{Path(file).name} — window")).to_be_visible(timeout=RESULT_MS)
    frame = page.frame_locator(VIEWER)
    expect(frame.locator("#status")).to_have_text("", timeout=RESULT_MS)
    expect(frame.get_by_test_id("viewer-window")).not_to_have_text("", timeout=RESULT_MS)
    return frame


def _window(frame) -> tuple[float, float]:
    readout = frame.get_by_test_id("viewer-window")
    return float(readout.get_attribute("data-width")), float(readout.get_attribute("data-center"))


def _scale(frame) -> float:
    return float(frame.get_by_test_id("viewer-zoom").get_attribute("data-scale"))


def _settle(page) -> None:
    page.wait_for_timeout(400)  # one render: the readouts update on Cornerstone's render events


def test_zoom_window_level_presets_and_reset(server, tmp_path):
    from playwright.sync_api import sync_playwright

    from medvit.data.dicom import read_image
    from medvit.review.display import window_presets

    url, _db, _log = server
    dicom = dicom_path("RG1_UNCI.dcm")
    image = read_image(dicom)
    header, lung, mediastinum = window_presets(image, image.raw)
    artifacts = artifact_dir(tmp_path)
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1600, "height": 1100})
        try:
            frame = _open(page, url, dicom)
            assert _window(frame) == pytest.approx((header.width, header.center))  # the header's VOI, 30000/15000
            fit = _scale(frame)
            assert 0.05 < fit < 1.0  # the whole 1841 x 1955 image fits: it is shown below full resolution
            page.screenshot(path=str(artifacts / "viewer_loaded.png"))

            box = page.locator(VIEWER).bounding_box()
            stage = frame.locator("#viewport").bounding_box()
            x, y = stage["x"] + stage["width"] / 2, stage["y"] + stage["height"] / 2
            assert box["y"] <= stage["y"] and stage["height"] > 400  # the image gets most of the window

            page.mouse.move(x, y)  # left-drag: window/level
            page.mouse.down()
            page.mouse.move(x + 120, y + 60, steps=10)
            page.mouse.up()
            _settle(page)
            width, center = _window(frame)
            assert width != header.width and center != header.center
            assert _scale(frame) == pytest.approx(fit)  # window/level does not zoom

            page.mouse.wheel(0, -600)  # wheel: zoom in about the pointer
            _settle(page)
            wheel = _scale(frame)
            assert wheel > fit * 1.02
            frame.get_by_role("button", name="+").click()
            _settle(page)
            assert _scale(frame) == pytest.approx(wheel * 1.25, rel=1e-3)
            assert _window(frame) == pytest.approx((width, center))  # zoom does not window
            page.screenshot(path=str(artifacts / "viewer_zoomed.png"))

            frame.get_by_role("button", name="Lung").click()
            _settle(page)
            assert _window(frame) == pytest.approx((lung.width, lung.center), rel=1e-3)
            frame.locator("#viewport").click(button="middle")  # focus the viewer without windowing
            page.keyboard.press("m")
            _settle(page)
            assert _window(frame) == pytest.approx((mediastinum.width, mediastinum.center), rel=1e-3)
            page.screenshot(path=str(artifacts / "viewer_mediastinum.png"))

            inverted = frame.locator("body").get_attribute("data-inverted")
            assert inverted == "true"  # MONOCHROME1: shown inverted, as the header says
            page.keyboard.press("i")
            _settle(page)
            assert frame.locator("body").get_attribute("data-inverted") == "false"

            frame.get_by_role("button", name="Reset").click()
            _settle(page)
            assert _window(frame) == pytest.approx((header.width, header.center))
            assert _scale(frame) == pytest.approx(fit, rel=0.05)
            assert frame.locator("body").get_attribute("data-inverted") == "true"
            assert "Traceback" not in page.content()
        finally:
            page.screenshot(path=str(artifacts / "viewer_reset.png"))
            browser.close()
    assert (artifacts / "viewer_zoomed.png").stat().st_size > 10_000


def test_lossy_marking_and_saliency_legend(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, _db, _log = server
    artifacts = artifact_dir(tmp_path)
    lossy = tmp_path / "RG1_J2KR_lossy_tag.dcm"  # the same reversible J2K, tagged as once lossy-compressed
    ds = pydicom.dcmread(dicom_path("RG1_J2KR.dcm"))
    ds.LossyImageCompression = "01"
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(lossy)
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1600, "height": 1100})
        try:
            frame = _open(page, url, dicom_path("RG1_J2KR.dcm"))
            expect(frame.get_by_test_id("viewer-lossy")).to_be_hidden()  # J2KR: reversible, lossless
            expect(frame.get_by_test_id("viewer-legend")).to_be_hidden()  # saliency starts off

            page.locator('[data-testid="stSelectbox"]').filter(has_text="Saliency").click()
            page.get_by_role("option", name="Grad-CAM (one finding)").click()
            legend = frame.get_by_test_id("viewer-legend")
            expect(legend).to_be_visible(timeout=RESULT_MS)
            expect(legend).to_contain_text("Grad-CAM · ")
            expect(legend).to_contain_text("1.00 (strongest)")
            expect(frame.locator("#colorbar")).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
            expect(frame.locator("#overlay")).to_be_visible()
            page.screenshot(path=str(artifacts / "viewer_saliency.png"))

            frame = _open(page, url, str(lossy))
            badge = frame.get_by_test_id("viewer-lossy")
            expect(badge).to_be_visible(timeout=RESULT_MS)
            expect(badge).to_contain_text("LOSSY: LossyImageCompression 01")
            assert "Traceback" not in page.content()
        finally:
            page.screenshot(path=str(artifacts / "viewer_lossy.png"))
            browser.close()
