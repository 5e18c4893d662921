"""The sign-in gate the review page passes first: nothing about a patient is drawn until it returns an account.

Local mode (the default) has no sign-in and returns the local pseudo-user. Site mode (``MEDVIT_AUTH=accounts``)
shows a sign-in form until `medvit.review.accounts.sign_in` accepts a name and password, then keeps the account
in this browser session's `st.session_state` (server-side; a reload starts a new session). A session ends on
"Sign out", when the account is disabled, or after ``MEDVIT_SESSION_IDLE_MINUTES`` without activity: a small
timer checks the idle time, so an unattended screen clears itself without waiting for the next click.
Ending a session clears the whole session state, so the next person at the screen inherits nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import streamlit as st

from medvit.errors import MedvitError
from medvit.review.accounts import LOCAL_ACCOUNT, PASSWORD_MAX, Account, get_account, sign_in
from medvit.review.audit import record
from medvit.review.settings import AppSettings
from medvit.review.store import ReviewStore
from medvit.review.tables import REVIEWER_MAX

_log = logging.getLogger("medvit.app")

_ACCOUNT = "_medvit_account"  # st.session_state keys
_LAST_ACTIVE = "_medvit_last_active"
_NOTICE = "_medvit_signin_notice"


def current_user(store: ReviewStore | None, settings: AppSettings) -> Account | None:
    """The account using this page, or None after drawing the sign-in form (the page must then stop).

    Every page run is activity: this call and `mark_active` at the end of the run restart the idle clock.
    """
    if settings.auth == "local":
        return LOCAL_ACCOUNT
    if store is None:
        st.error("Sign-in needs the review database, which could not be opened; nothing else is shown.")
        return None
    state = st.session_state
    account: Account | None = state.get(_ACCOUNT)
    now = time.time()
    if account is not None and now - state.get(_LAST_ACTIVE, 0.0) > settings.idle_minutes * 60:
        _log.info("%s signed out after %g idle minutes", account.name, settings.idle_minutes)
        unit = "minute" if settings.idle_minutes == 1 else "minutes"
        sign_out(f"Signed out after {settings.idle_minutes:g} {unit} without activity.")
        account = None
    elif account is not None and account.id is not None:
        fresh = get_account(store.engine, account.id)
        if fresh is None or fresh.disabled:
            sign_out("This account has been disabled; ask an admin.")
            account = None
        else:
            account = state[_ACCOUNT] = fresh
    if account is None:
        _signin_form(store)
        return None
    state[_LAST_ACTIVE] = now
    st.sidebar.caption(f"Signed in as **{account.name}** ({account.role})")
    st.sidebar.button("Sign out", key="_medvit_signout", on_click=sign_out, args=("Signed out.",))
    period = min(30.0, max(1.0, settings.idle_minutes * 60 / 4))
    st.fragment(_idle_watch, run_every=period)(settings.idle_minutes * 60)
    return account


def mark_active() -> None:
    """Restart a signed-in session's idle clock; the page calls it when a run ends, so that a long run (the first
    model load) is not counted as idle time."""
    if _ACCOUNT in st.session_state:
        st.session_state[_LAST_ACTIVE] = time.time()


def sign_out(notice: str) -> None:
    """End the session: forget the account and everything else this browser session held."""
    st.session_state.clear()
    st.session_state[_NOTICE] = notice


def reveal_audit(store: ReviewStore | None, account: Account, image_uid: str) -> Callable[[], None] | None:
    """What the identifier panel calls on each reveal: an audit event in site mode (nothing in local mode)."""
    if account.is_local or store is None:
        return None
    engine = store.engine
    return lambda: record(engine, account.name, "reveal_identifiers", image_uid)


def _idle_watch(idle_seconds: float) -> None:
    """Runs on a timer (a fragment, so it is not activity): rerun the page once the session has expired."""
    last = st.session_state.get(_LAST_ACTIVE)
    if last is not None and time.time() - last > idle_seconds:
        st.rerun(scope="app")


def _signin_form(store: ReviewStore) -> None:
    notice = st.session_state.pop(_NOTICE, None)
    if notice:
        st.info(notice)
    st.subheader("Sign in")
    with st.form("_medvit_signin", clear_on_submit=True):
        name = st.text_input("Account name", max_chars=REVIEWER_MAX, autocomplete="username", key="_medvit_name")
        password = st.text_input("Password", type="password", max_chars=PASSWORD_MAX, autocomplete="current-password",
                                 key="_medvit_password")  # fmt: skip
        submitted = st.form_submit_button("Sign in")
    if not submitted:
        return
    try:
        account = sign_in(store.engine, name, password)
    except MedvitError as e:
        st.error(str(e)[:1].upper() + str(e)[1:])
        return
    except Exception as e:  # noqa: BLE001 - the page must never show a traceback
        _log.exception("sign-in failed")
        st.error(f"Sign-in: unexpected {type(e).__name__}; the details are in the server log.")
        return
    st.session_state[_ACCOUNT] = account
    st.session_state[_LAST_ACTIVE] = time.time()
    st.rerun()
