"""A real browser against a real `medvit review` server: upload RG1_UNCI.dcm, wait for the findings, submit a review,
find it in the database, save a screenshot. The server and Chromium come from _server.py.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from _inference_run import make_tiny_run
from _server import RESULT_MS, artifact_dir, launch, require_browser, review_server, shared_server, upload  # noqa: F401
from conftest import stored_reviews
from conftest import testdata as dicom_path

pytestmark = pytest.mark.e2e


def _rows(page) -> list[str]:
    """The findings rows on screen, top to bottom (their containers are keyed frow_<i>_<image>)."""
    return [t.strip() for t in page.locator('[class*="st-key-frow_"] [data-testid="stMarkdownContainer"] p')
            .filter(has_not_text="AUROC").all_inner_texts() if t.strip()]  # fmt: skip


def test_review_queue_keys_edits_and_masking_in_a_real_browser(server, tmp_path, dev_images):
    from playwright.sync_api import expect, sync_playwright

    url, db, log = server
    artifacts = artifact_dir(tmp_path)
    dicom = Path(dicom_path("RG1_UNCI.dcm"))
    blank = tmp_path / "blank.png"
    from PIL import Image

    Image.new("L", (256, 256), 0).save(blank)
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1600, "height": 1400})
        try:
            page.goto(url)
            expect(page.get_by_text("not a diagnostic device")).to_be_visible(timeout=RESULT_MS)
            uploader = page.locator('[data-testid="stFileUploader"] input[type="file"]')
            expect(uploader).to_be_attached(timeout=RESULT_MS)  # drawn once the model is loaded
            upload(page, dicom)
            expect(page.get_by_text("RG1_UNCI.dcm").first).to_be_visible(timeout=RESULT_MS)
            expect(page.get_by_role("heading", name="Findings")).to_be_visible(timeout=RESULT_MS)
            # this image's rows (keyed frow_<i>_<sha256[:12]>): the first image's stay on screen while the page reruns
            key = hashlib.sha256(dicom.read_bytes()).hexdigest()[:12]
            rows = page.locator(f'[class*="st-key-frow_"][class*="_{key}"]')
            expect(rows.first).to_be_visible(timeout=RESULT_MS)
            stale = page.locator(f'[class*="st-key-frow_"]:not([class*="_{key}"])')
            expect(stale).to_have_count(0, timeout=RESULT_MS)  # removed when the page run ends
            expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=RESULT_MS)
            n_flagged = rows.count()
            assert 0 < n_flagged < 14 and rows.filter(has_text="flagged").count() == n_flagged  # flagged first
            page.locator(f'[class*="st-key-all_{key}"]').get_by_text("Show all findings (").click()
            expect(rows).to_have_count(14, timeout=RESULT_MS)
            texts = [rows.nth(i).text_content() or "" for i in range(14)]
            assert all("flagged" in t for t in texts[:n_flagged]) and "flagged" not in texts[n_flagged], texts
            page.wait_for_timeout(1000)
            page.screenshot(path=str(artifacts / "review_findings.png"))

            first = rows.nth(0).locator('[data-testid="stMarkdownContainer"] p').first.inner_text().strip()
            rows.nth(0).locator("button").filter(has_text="present").click()  # inline verdict
            page.evaluate("document.activeElement && document.activeElement.blur()")  # keys go to the page
            page.keyboard.press("j")  # keys: the second row, set absent
            page.keyboard.press("a")
            expect(page.get_by_text("2 verdict(s) set.")).to_be_visible(timeout=RESULT_MS)
            page.get_by_label("Reviewer name").fill("Dr Browser")
            page.get_by_label("Note").fill("checked in Chromium")
            page.get_by_role("button", name="Save review").click()
            expect(page.get_by_text("Saved review #1")).to_be_visible(timeout=RESULT_MS)
            rows.nth(0).locator("button").filter(has_text="uncertain").click()  # edit the saved review
            expect(page.get_by_text("2 verdict(s) set.")).to_be_visible(timeout=RESULT_MS)
            page.get_by_role("button", name="Save review").click()
            expect(page.get_by_text("Updated review #1")).to_be_visible(timeout=RESULT_MS)
            page.screenshot(path=str(artifacts / "review_saved.png"))

            page.get_by_text("Patient identifiers", exact=True).click()  # reveal on this image...
            page.get_by_text("Show patient identifiers").click()
            expect(page.get_by_text("CompressedSamples^RG1")).to_be_attached(timeout=RESULT_MS)  # a data grid cell
            upload(page, sorted(dev_images.glob("*.png"))[0])  # ...and the next one is masked
            expect(page.get_by_text("no DICOM header")).to_be_visible(timeout=RESULT_MS)
            expect(page.get_by_text("CompressedSamples^RG1")).to_have_count(0)

            expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=RESULT_MS)  # the page run is over:
            upload(page, blank)  # a blank image is refused
            expect(page.get_by_text("uniform").first).to_be_visible(timeout=RESULT_MS)
            expect(rows).to_have_count(0)
            page.screenshot(path=str(artifacts / "review_blank_refused.png"))
            assert "Traceback" not in page.content()
        finally:
            page.screenshot(path=str(artifacts / "review_last.png"))
            browser.close()

    [review] = stored_reviews(db)
    assert review.reviewer == "Dr Browser" and review.note == "checked in Chromium"
    assert review.labels[first] is None and len(review.verdicts) == 2 and len(review.edits) == 1
    assert review.edits[0].verdicts[first] in ("agree", "disagree")
    assert review.image_uid == "1.3.6.1.4.1.5962.1.1.9.1.3.20040826185059.5457"


def test_worklist_next_and_previous_in_a_real_browser(worklist_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url = worklist_server
    artifacts = artifact_dir(tmp_path)
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1600, "height": 1200})
        try:
            page.goto(url)
            expect(page.get_by_text("1 of 3")).to_be_visible(timeout=RESULT_MS)
            expect(page.get_by_text("Modality CT").first).to_be_visible(timeout=RESULT_MS)  # first item: refused
            page.get_by_role("button", name="Next ▶").click()
            expect(page.get_by_text("2 of 3")).to_be_visible(timeout=RESULT_MS)
            expect(page.get_by_role("heading", name="Findings")).to_be_visible(timeout=RESULT_MS)
            page.evaluate("document.activeElement && document.activeElement.blur()")
            page.keyboard.press("n")  # the same with the key
            expect(page.get_by_text("3 of 3")).to_be_visible(timeout=RESULT_MS)
            page.get_by_role("button", name="◀ Previous").click()
            expect(page.get_by_text("2 of 3")).to_be_visible(timeout=RESULT_MS)
            page.screenshot(path=str(artifacts / "review_worklist.png"))
        finally:
            browser.close()


@pytest.fixture
def worklist_server(tmp_path: Path, dev_images: Path) -> Iterator[str]:
    """`medvit review --worklist` over a CT (refused), RG1_UNCI.dcm and an NIH PNG."""
    require_browser()
    folder = tmp_path / "worklist"
    folder.mkdir()
    for name in ("CT_small.dcm", "RG1_UNCI.dcm"):
        os.symlink(dicom_path(name), folder / name)
    os.symlink(sorted(dev_images.glob("*.png"))[0], folder / "z_nih.png")
    run = make_tiny_run(tmp_path / "run")
    env = dict(os.environ, MEDVIT_BACKEND="torch", MEDVIT_CACHE=str(tmp_path / "cache"))
    args = ["--run", str(run), "--db", f"sqlite:///{tmp_path / 'reviews.sqlite3'}", "--worklist", str(folder)]
    with review_server(args, env, tmp_path / "server.log") as url:
        yield url
