"""What every browser test needs, in one place: Debian's Chromium, a real `medvit review` server on a free localhost
port (started, waited for, stopped by its PID) and a folder for screenshots.

Chromium is Debian's (`apt-get install chromium`), passed to Playwright as the executable: Playwright's own browser
download cannot work offline. Screenshots go to $MEDVIT_ARTIFACT_DIR (default: the test's tmp dir).
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from _inference_run import make_tiny_run
from conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("MEDVIT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
STARTUP_S = 180
RESULT_MS = 180_000


def require_browser() -> None:
    """Skip, saying what to install, when Chromium or the Playwright package is missing."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} not found: `apt-get install -y chromium` (or set MEDVIT_CHROMIUM)")
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (the Python package only)")


def launch(playwright: Any) -> Any:
    """Debian's headless Chromium under Playwright."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def upload(page: Any, path: Path | str) -> None:
    """Pick a file in the sidebar uploader as a reader does (click the drop zone, choose in the file dialog) and wait
    until its chip lists it, by the full name on its remove button (the chip's text is shortened). Streamlit's
    uploader sometimes ignores a file chosen just after a page run (seen in CI: the previous file stayed listed and
    the test waited in vain); a choice that does not appear within 15 s is made again, up to 3 times. Setting the
    hidden input's files directly was ignored on every retry."""
    from playwright.sync_api import expect

    chip = page.locator('[data-testid="stFileUploader"]').get_by_role("button", name=f"Remove {Path(path).name}")
    for attempt in range(3):
        with page.expect_file_chooser() as chooser:  # as a reader does: click the drop zone, pick the file
            page.get_by_test_id("stFileUploaderDropzone").click()
        chooser.value.set_files(str(path))
        try:
            expect(chip).to_be_visible(timeout=15_000)
            return
        except AssertionError:
            if attempt == 2:
                raise


def artifact_dir(tmp_path: Path) -> Path:
    """$MEDVIT_ARTIFACT_DIR (CI keeps it), else a folder in the test's tmp dir."""
    out = Path(os.environ.get("MEDVIT_ARTIFACT_DIR") or tmp_path / "artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, context: ssl.SSLContext | None) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"medvit review exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2, context=context) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"medvit review did not become healthy in {STARTUP_S} s:\n{log.read_text()[-3000:]}")


@contextmanager
def review_server(args: list[str], env: dict[str, str], log: Path, *, tls: bool = False) -> Iterator[str]:
    """`medvit review ARGS` on a free port, its output appended to `log`; yields the URL once /_stcore/health
    answers (over HTTPS with the test's self-signed certificate when `tls`), then stops it by its PID."""
    port = free_port()
    cmd = [sys.executable, "-m", "medvit", "review", "--port", str(port), *args]
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    context = None
    if tls:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    url = f"{'https' if tls else 'http'}://localhost:{port}"
    try:
        _wait_healthy(url, proc, log, context)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module", name="server")
def shared_server(tmp_path_factory: pytest.TempPathFactory, dev_images: Path) -> Iterator[tuple[str, str, Path]]:
    """`medvit review` with a tiny real run and a temp SQLite database, opened on an NIH PNG (so an upload visibly
    changes the page). One per test module, shared by its tests: the viewer tests save no review, so the review
    test still finds exactly its own in the database."""
    require_browser()
    tmp = tmp_path_factory.mktemp("review_server")
    run = make_tiny_run(tmp / "run")
    db = f"sqlite:///{tmp / 'reviews.sqlite3'}"
    env = dict(os.environ, MEDVIT_BACKEND="torch", MEDVIT_CACHE=str(tmp / "cache"))
    log = tmp / "server.log"
    first = sorted(dev_images.glob("*.png"))[0]
    with review_server(["--run", str(run), "--db", db, "--file", str(first)], env, log) as url:
        yield url, db, log
