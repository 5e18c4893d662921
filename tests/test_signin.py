"""The sign-in gate and roles in the real review page (Streamlit's AppTest), with a tiny real run and a temp
SQLite database: nothing before sign-in, idle expiry, disabling, sign-out, the signed-in user on every review,
and what a reviewer and an admin may see. The same in a real browser: tests/e2e/test_signin_browser.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from _inference_run import make_tiny_run
from conftest import stored_reviews
from sqlalchemy import select
from sqlalchemy.orm import Session
from streamlit.testing.v1 import AppTest

from medvit.review import audit
from medvit.review.accounts import REFUSED, add_account, disable_account
from medvit.review.settings import IDLE_ENV
from medvit.review.store import ReviewStore
from medvit.review.tables import ReviewRow

APP = Path(__file__).resolve().parents[1] / "apps" / "review.py"
TIMEOUT = 180
PASSWORD = "site-mode-canary-Pw1"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("signin") / "run")


@pytest.fixture
def site(monkeypatch, tmp_path, run_dir) -> ReviewStore:
    """Site mode on a fresh database with one reviewer ("rita") and one admin ("adam")."""
    db = f"sqlite:///{tmp_path / 'reviews.sqlite3'}"
    for name in ("MEDVIT_FILE", "MEDVIT_WORKLIST", "MEDVIT_CLIP", "MEDVIT_MAX_UPLOAD_MB", IDLE_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MEDVIT_AUTH", "accounts")
    monkeypatch.setenv("MEDVIT_RUN", str(run_dir))
    monkeypatch.setenv("MEDVIT_BACKEND", "torch")
    monkeypatch.setenv("MEDVIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MEDVIT_DB_URL", db)
    store = ReviewStore(db)
    add_account(store.engine, "rita", PASSWORD, "reviewer", actor="test")
    add_account(store.engine, "adam", PASSWORD, "admin", actor="test")
    yield store
    store.close()


def _no_crash(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _shows_patient_data(at: AppTest) -> bool:
    """Any image, table or finding on the page (the sign-in form has none of these)."""
    return bool(at.get("imgs") or at.dataframe or any("Findings" in s.value for s in at.subheader))


def _sign_in(at: AppTest, name: str, password: str) -> AppTest:
    at.text_input(key="_medvit_name").input(name)
    at.text_input(key="_medvit_password").input(password)
    next(b for b in at.button if b.label == "Sign in").click().run()
    _no_crash(at)
    return at


def _opened() -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    _no_crash(at)
    return at


def test_nothing_is_shown_before_sign_in_and_a_wrong_password_is_refused(site):
    at = _opened()
    assert "not a diagnostic device" in at.warning[0].value
    assert [s.value for s in at.subheader] == ["Sign in"]
    assert not _shows_patient_data(at)
    _sign_in(at, "rita", PASSWORD + "x")
    assert [e.value for e in at.error] == [REFUSED[:1].upper() + REFUSED[1:]]
    assert not _shows_patient_data(at)


def test_a_model_loaded_by_the_server_warm_up_still_waits_for_sign_in(site):
    """`medvit review` loads the model in the server before any session (`medvit.review.launch`); site mode still
    shows nothing of it, or of a patient, before sign-in."""
    import streamlit as st

    from medvit.resources import APP_SCRIPT
    from medvit.review.launch import warm_up

    st.cache_resource.clear()
    try:
        warm_up()
        at = AppTest.from_file(str(APP_SCRIPT), default_timeout=TIMEOUT).run()
        _no_crash(at)
        assert [s.value for s in at.subheader] == ["Sign in"] and not _shows_patient_data(at)
        assert not any("Model" in c.value for c in at.sidebar.caption)
        assert _shows_patient_data(_sign_in(at, "rita", PASSWORD))
    finally:
        st.cache_resource.clear()


def test_a_reviewer_reviews_as_themself_and_cannot_reveal_or_monitor(site):
    at = _sign_in(_opened(), "rita", PASSWORD)
    assert not at.error, [e.value for e in at.error]
    assert _shows_patient_data(at)
    assert any("Signed in as **rita** (reviewer)" in c.value for c in at.sidebar.caption)
    assert not [r for r in at.sidebar.radio if r.key == "page"]  # no Monitoring page to choose
    assert not [t for t in at.toggle if t.key and t.key.startswith("show_phi")]
    assert any("Only an admin may reveal" in c.value for c in at.caption)
    assert not [t for t in at.text_input if t.label == "Reviewer name"]  # the account is the reviewer

    at.button_group[0].set_value("present").run()  # the first finding's verdict
    next(b for b in at.button if b.label == "Save review").click().run()
    _no_crash(at)
    assert any("Saved review #1" in s.value for s in at.success), [e.value for e in at.error]
    [review] = stored_reviews(site.url)
    assert review.reviewer == "rita"
    with Session(site.engine) as session:
        assert session.scalar(select(ReviewRow.user_id)) == 1  # rita's account id
    assert [e.event for e in audit.events(site.engine, actor="rita")] == ["signin_ok"]


def test_an_admin_reveals_identifiers_with_an_audit_row_and_opens_monitoring(site):
    at = _sign_in(_opened(), "adam", PASSWORD)
    [toggle] = [t for t in at.toggle if t.key and t.key.startswith("show_phi")]
    toggle.set_value(True).run()
    _no_crash(at)
    frames = [d.value for d in at.dataframe if "field" in d.value and "PatientName" in d.value["field"].tolist()]
    assert "CompressedSamples^RG1" in frames[0]["value"].tolist()
    [reveal] = audit.events(site.engine, event="reveal_identifiers")
    assert (reveal.actor, reveal.target) == ("adam", "1.3.6.1.4.1.5962.1.1.9.1.3.20040826185059.5457")
    at.run()  # a rerun with the identifiers still shown is no new reveal
    assert len(audit.events(site.engine, event="reveal_identifiers")) == 1
    toggle = next(t for t in at.toggle if t.key == toggle.key)
    toggle.set_value(False).run()  # masked again, then revealed again: a second reveal, recorded
    next(t for t in at.toggle if t.key == toggle.key).set_value(True).run()
    assert len(audit.events(site.engine, event="reveal_identifiers")) == 2
    at.sidebar.radio(key="page").set_value("Monitoring").run()
    _no_crash(at)
    assert any(h.value == "Monitoring" for h in at.header)
    assert not at.get("imgs")


def test_idle_sessions_disabled_accounts_and_sign_out_end_the_session(site, monkeypatch):
    at = _sign_in(_opened(), "rita", PASSWORD)
    assert _shows_patient_data(at)
    at.session_state["_medvit_last_active"] = time.time() - 16 * 60  # default idle limit: 15 minutes
    at.run()
    assert not _shows_patient_data(at)
    assert any("Signed out after 15 minutes without activity" in i.value for i in at.info)

    _sign_in(at, "rita", PASSWORD)
    assert _shows_patient_data(at)
    disable_account(site.engine, "rita", actor="test")
    at.run()
    assert not _shows_patient_data(at) and any("disabled" in i.value for i in at.info)

    _sign_in(at, "adam", PASSWORD)
    next(b for b in at.sidebar.button if b.label == "Sign out").click().run()
    assert not _shows_patient_data(at) and [s.value for s in at.subheader] == ["Sign in"]
