"""Site mode in a real browser against a real `medvit review --auth accounts` served over HTTPS (a self-signed
certificate): nothing is shown before sign-in, a wrong password is refused, repeated failures lock the account,
a reviewer can neither open Monitoring nor reveal identifiers, an admin can (and the reveal is audited), an
idle session clears itself. Afterwards the database and the server log are searched for the test passwords.

The server and Chromium come from _server.py; screenshots go to $MEDVIT_ARTIFACT_DIR (default: the test's tmp dir).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _inference_run import make_tiny_run
from _server import RESULT_MS, ROOT, artifact_dir, launch, require_browser, review_server
from conftest import database_text, self_signed_cert
from conftest import testdata as dicom_path

pytestmark = pytest.mark.e2e

PASSWORDS = {"rita": "rita-Canary-pw-1", "adam": "adam-Canary-pw-2", "lou": "lou-Canary-pw-3"}
WRONG = "not-the-Canary-pw"
IDLE_MINUTES = 1
PATIENT_NAME = "CompressedSamples^RG1"  # RG1_UNCI.dcm's PatientName
IMAGE = '[data-testid="stImage"], [data-testid="stCustomComponentV1"]'  # st.image or the viewer component


@pytest.fixture
def site_server(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """`medvit review` in site mode over HTTPS on a free localhost port, with three accounts made by `medvit users`."""
    require_browser()
    run = make_tiny_run(tmp_path / "run")
    db = f"sqlite:///{tmp_path / 'reviews.sqlite3'}"
    env = dict(os.environ, MEDVIT_BACKEND="torch", MEDVIT_CACHE=str(tmp_path / "cache"), MEDVIT_AUTH="accounts",
               MEDVIT_SESSION_IDLE_MINUTES=str(IDLE_MINUTES), MEDVIT_DB_URL=db)  # fmt: skip
    log = tmp_path / "server.log"
    with log.open("w") as out:
        for name, role in (("rita", "reviewer"), ("adam", "admin"), ("lou", "reviewer")):
            subprocess.run([sys.executable, "-m", "medvit", "users", "add", name, "--role", role], env=env, cwd=ROOT,
                           input=PASSWORDS[name] + "\n", text=True, stdout=out, stderr=subprocess.STDOUT,
                           check=True, timeout=120)  # fmt: skip
    cert, key = self_signed_cert(tmp_path / "tls")
    args = ["--run", str(run), "--file", dicom_path("RG1_UNCI.dcm"), "--tls-cert", str(cert), "--tls-key", str(key)]
    with review_server(args, env, log, tls=True) as url:
        yield url, db, log


def _attempts(db: str) -> int:
    """Sign-in attempts the server has recorded so far (read with the standard library, no app code)."""
    with contextlib.closing(sqlite3.connect(db.removeprefix("sqlite:///"), timeout=30)) as conn:
        return conn.execute("SELECT count(*) FROM audit_events WHERE event LIKE 'signin_%'").fetchone()[0]


def _sign_in(page, db: str, name: str, password: str) -> None:
    """Submit the form and wait until the server has handled this attempt (its audit row exists), so that
    quick successive clicks are not folded into one rerun."""
    before = _attempts(db)
    page.get_by_label("Account name").fill(name)
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_role("button", name="Sign in").click()
    deadline = time.monotonic() + RESULT_MS / 1000
    while _attempts(db) == before:
        assert time.monotonic() < deadline, "the server never handled the sign-in"
        time.sleep(0.2)


def _open_identifiers(page) -> None:
    """Open the "Patient identifiers" expander from the keyboard: while the page scrolls, the sticky viewer may lie
    over it, and a mouse click would land on the viewer."""
    page.locator("summary", has_text="Patient identifiers").press("Enter")


def _assert_nothing_shown(page) -> None:
    """No image (st.image or the viewer component), data grid (a canvas) or finding on the page. The only frame
    allowed is the keyboard-shortcut listener (`medvit.review.keys`, an st.iframe holding a constant script).
    Streamlit removes the previous run's elements when the new run ends, which on a loaded machine can come a few
    seconds after the run's first message: each count must reach zero within 30 s."""
    from playwright.sync_api import expect

    for gone in (page.locator(f'{IMAGE}, img, canvas, iframe:not([data-testid="stIFrame"])'),
                 page.get_by_test_id("stDataFrame"), page.get_by_role("heading", name="Findings")):
        expect(gone).to_have_count(0, timeout=30_000)
    assert PATIENT_NAME not in page.content()


def test_sign_in_roles_lockout_and_idle_expiry_in_a_real_browser(site_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, db, log = site_server
    artifacts = artifact_dir(tmp_path)
    with sync_playwright() as p:
        browser = launch(p)

        def fresh_page():  # one browser context per person: its own Streamlit session
            context = browser.new_context(ignore_https_errors=True, viewport={"width": 1600, "height": 1400})
            page = context.new_page()
            page.goto(url)
            expect(page.get_by_role("button", name="Sign in")).to_be_visible(timeout=RESULT_MS)
            return page

        try:
            page = fresh_page()
            expect(page.get_by_text("not a diagnostic device")).to_be_visible()
            page.wait_for_timeout(1000)
            _assert_nothing_shown(page)
            page.screenshot(path=str(artifacts / "signin_form.png"))
            _sign_in(page, db, "rita", WRONG)
            expect(page.get_by_text("wrong account name or password")).to_be_visible(timeout=RESULT_MS)
            _assert_nothing_shown(page)

            for _ in range(5):  # lou's account locks after five failures...
                _sign_in(page, db, "lou", WRONG)
            expect(page.get_by_text("the account is locked for 15 minutes")).to_be_visible(timeout=RESULT_MS)
            _sign_in(page, db, "lou", PASSWORDS["lou"])  # ...and then even the right password is refused
            expect(page.get_by_text("is locked after 5 failed sign-ins")).to_be_visible(timeout=RESULT_MS)
            _assert_nothing_shown(page)

            _sign_in(page, db, "rita", PASSWORDS["rita"])  # a reviewer: reviews, no monitoring, no identifiers
            expect(page.get_by_role("heading", name="Findings")).to_be_visible(timeout=RESULT_MS)
            expect(page.locator(IMAGE).first).to_be_visible(timeout=RESULT_MS)
            expect(page.get_by_text("Signed in as rita (reviewer)")).to_be_visible()
            assert page.get_by_text("Monitoring", exact=True).count() == 0
            _open_identifiers(page)
            expect(page.get_by_text("Only an admin may reveal patient identifiers.")).to_be_visible()
            assert page.get_by_text("Show patient identifiers", exact=True).count() == 0
            assert PATIENT_NAME not in page.content()
            page.screenshot(path=str(artifacts / "signin_reviewer.png"))
            page.get_by_role("button", name="Sign out").click()
            expect(page.get_by_role("button", name="Sign in")).to_be_visible(timeout=RESULT_MS)
            _assert_nothing_shown(page)

            page = fresh_page()  # an admin: reveals identifiers (audited) and opens Monitoring
            _sign_in(page, db, "adam", PASSWORDS["adam"])
            expect(page.get_by_role("heading", name="Findings")).to_be_visible(timeout=RESULT_MS)
            _open_identifiers(page)
            page.get_by_role("switch", name="Show patient identifiers").press("Space")
            page.wait_for_timeout(1500)  # the data grid draws on a canvas; read the audit row instead below
            page.screenshot(path=str(artifacts / "signin_admin_identifiers.png"))
            page.get_by_text("Monitoring", exact=True).click()
            expect(page.get_by_role("heading", name="Monitoring")).to_be_visible(timeout=RESULT_MS)
            page.screenshot(path=str(artifacts / "signin_admin_monitoring.png"))

            page = fresh_page()  # idle: the screen clears itself without any click
            _sign_in(page, db, "rita", PASSWORDS["rita"])
            expect(page.get_by_role("heading", name="Findings")).to_be_visible(timeout=RESULT_MS)
            expect(page.get_by_text(f"Signed out after {IDLE_MINUTES} minute without activity")).to_be_visible(
                timeout=(IDLE_MINUTES * 60 + 90) * 1000
            )
            _assert_nothing_shown(page)
            assert "Traceback" not in page.content()
        finally:
            browser.close()

    from medvit.review import audit
    from medvit.review.store import ReviewStore

    store = ReviewStore(db)
    try:
        [reveal] = audit.events(store.engine, event="reveal_identifiers")
        assert (reveal.actor, reveal.target) == ("adam", "1.3.6.1.4.1.5962.1.1.9.1.3.20040826185059.5457")
        reasons = [e.detail["reason"] for e in audit.events(store.engine, event="signin_failed")]
        assert reasons.count("wrong_password") == 6 and reasons.count("locked") == 1
        assert {e.actor for e in audit.events(store.engine, event="signin_ok")} == {"rita", "adam"}
    finally:
        store.close()
    text, server_log = database_text(db), log.read_text()
    files = b"".join(f.read_bytes() for f in tmp_path.glob("reviews.sqlite3*"))  # the database, its WAL and shm
    assert "medvit review: https://localhost" in server_log and "$argon2id$" in text
    for secret in [*PASSWORDS.values(), WRONG]:
        assert secret not in server_log and secret not in text and secret.encode() not in files
