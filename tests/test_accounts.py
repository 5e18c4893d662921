"""Site mode: accounts (argon2 hashes only, lockout, disabled, unknown names), roles, the audit trail, the
`medvit users` command and the refusal to serve beyond localhost without sign-in and TLS.

The database tests run on SQLite and on PostgreSQL (`MEDVIT_TEST_PG_URL`; skipped with the reason when unset).
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from conftest import database_text, self_signed_cert
from sqlalchemy import select
from sqlalchemy.orm import Session

from medvit.cli import main as cli_main
from medvit.errors import MedvitError
from medvit.review import accounts, audit
from medvit.review.accounts import (
    ACTIONS,
    LOCAL_ACCOUNT,
    LOCK_MINUTES,
    MAX_FAILURES,
    REFUSED,
    add_account,
    can,
    disable_account,
    list_accounts,
    sign_in,
)
from medvit.review.settings import AppSettings
from medvit.review.store import ReviewStore

PASSWORD = "Tr0ub4dor&3-plaintext-canary"  # searched for in every table, column and log
OTHER = "correct horse battery staple"


@pytest.fixture
def store(db_url):
    s = ReviewStore(db_url)
    yield s
    s.close()


def _database_text(store: ReviewStore) -> str:
    return database_text(store.url)


def test_only_an_argon2id_hash_is_stored_and_nothing_leaks_into_the_log(store, caplog):
    caplog.set_level(logging.DEBUG)
    add_account(store.engine, "alice", PASSWORD, "admin", actor="cli:test")
    assert sign_in(store.engine, "alice", PASSWORD).role == "admin"
    for attempt in (PASSWORD + "x", PASSWORD.upper()):
        with pytest.raises(MedvitError):
            sign_in(store.engine, "alice", attempt)
    with pytest.raises(MedvitError):  # someone types the password into the name field
        sign_in(store.engine, PASSWORD, PASSWORD)
    text = _database_text(store)
    assert "alice" in text and "$argon2id$" in text  # the scan does see the users table
    assert PASSWORD not in text and PASSWORD.upper() not in text
    assert PASSWORD not in caplog.text
    with Session(store.engine) as session:
        [row] = session.scalars(select(accounts.UserRow))
        assert row.password_hash.startswith("$argon2id$") and accounts._hasher.verify(row.password_hash, PASSWORD)


def test_unknown_names_cost_one_hash_and_read_like_a_wrong_password(store, monkeypatch):
    add_account(store.engine, "alice", PASSWORD, "reviewer", actor="cli:test")
    calls = []
    real_verify = PasswordHasher.verify
    monkeypatch.setattr(PasswordHasher, "verify", lambda self, h, p: calls.append(h) or real_verify(self, h, p))
    messages = []
    for name, password in (("nobody", PASSWORD), ("alice", OTHER), ("", OTHER), ("x" * 500, OTHER)):
        with pytest.raises(MedvitError) as info:
            sign_in(store.engine, name, password)
        messages.append(str(info.value))
    assert messages == [REFUSED] * 4
    assert len(calls) == 4  # one argon2 verification per attempt, known name or not
    failed = audit.events(store.engine, event="signin_failed")
    assert sorted(e.detail["reason"] for e in failed) == ["unknown_account"] * 3 + ["wrong_password"]
    assert {e.target for e in failed if e.detail["reason"] == "unknown_account"} == {None}  # typed names not kept
    assert "nobody" not in _database_text(store)


def test_names_are_case_insensitive_and_unique(store):
    add_account(store.engine, "Dr Smith", PASSWORD, "reviewer", actor="cli:test")
    assert sign_in(store.engine, "  dr smith ", PASSWORD).name == "Dr Smith"
    with pytest.raises(MedvitError, match="already exists"):
        add_account(store.engine, "DR SMITH", OTHER, "admin", actor="cli:test")
    assert [a.name for a in list_accounts(store.engine)] == ["Dr Smith"]


@pytest.mark.parametrize(
    ("name", "password", "role", "message"),
    [
        ("bob", "short", "reviewer", "at least 8"),
        ("bob", "x" * 2000, "reviewer", "longer than 1024"),
        ("bobbobbob", "BobBobBob", "reviewer", "must not be the account name"),
        ("bob", PASSWORD, "superuser", "role 'superuser' is not one of reviewer, admin"),
        ("", PASSWORD, "reviewer", "name is empty"),
        ("bob;drop", PASSWORD, "reviewer", "letters, digits"),
        ("b" * 121, PASSWORD, "reviewer", "at most 120"),
    ],
)
def test_bad_accounts_are_refused_with_one_line(store, name, password, role, message):
    with pytest.raises(MedvitError, match=message) as info:
        add_account(store.engine, name, password, role, actor="cli:test")
    assert "\n" not in str(info.value)
    assert list_accounts(store.engine) == []
    assert audit.events(store.engine) == []  # nothing half-done: no audit row for a refused account


def test_failures_lock_the_account_then_the_lock_expires(store):
    add_account(store.engine, "alice", PASSWORD, "admin", actor="cli:test")
    t0 = datetime.now(UTC)
    for _ in range(MAX_FAILURES - 1):  # failures must be consecutive: a good sign-in resets the count
        with pytest.raises(MedvitError, match="wrong account name or password$"):
            sign_in(store.engine, "alice", OTHER, now=t0)
    sign_in(store.engine, "alice", PASSWORD, now=t0)
    for _ in range(MAX_FAILURES):
        with pytest.raises(MedvitError) as info:
            sign_in(store.engine, "alice", OTHER, now=t0)
    assert f"locked for {LOCK_MINUTES} minutes" in str(info.value)
    [alice] = list_accounts(store.engine)
    assert alice.locked_until == t0 + timedelta(minutes=LOCK_MINUTES)
    for password in (PASSWORD, OTHER):  # while locked even the right password is refused, so guesses learn nothing
        with pytest.raises(MedvitError, match="locked after 5 failed sign-ins until"):
            sign_in(store.engine, "alice", password, now=t0 + timedelta(minutes=LOCK_MINUTES - 1))
    later = t0 + timedelta(minutes=LOCK_MINUTES, seconds=1)
    assert sign_in(store.engine, "alice", PASSWORD, now=later).name == "alice"
    [alice] = list_accounts(store.engine)
    assert alice.locked_until is None and alice.failed_signins == 0
    reasons = [e.detail["reason"] for e in reversed(audit.events(store.engine, event="signin_failed"))]
    assert reasons == ["wrong_password"] * (2 * MAX_FAILURES - 1) + ["locked", "locked"]
    assert len(audit.events(store.engine, event="signin_ok")) == 2


def test_a_disabled_account_cannot_sign_in_or_act(store):
    alice = add_account(store.engine, "alice", PASSWORD, "admin", actor="cli:root")
    assert can(alice, "see_monitoring")
    disabled = disable_account(store.engine, "ALICE", actor="cli:root")
    assert disabled.disabled and not any(can(disabled, a) for a in ACTIONS)
    with pytest.raises(MedvitError, match="disabled; ask an admin"):
        sign_in(store.engine, "alice", PASSWORD)
    with pytest.raises(MedvitError, match=f"^{REFUSED}$"):  # a wrong password learns nothing more
        sign_in(store.engine, "alice", OTHER)
    assert disable_account(store.engine, "alice", actor="cli:root").disabled  # a no-op the second time
    with pytest.raises(MedvitError, match="no account named 'carol'"):
        disable_account(store.engine, "carol", actor="cli:root")
    changes = [(e.event, e.actor, e.target) for e in reversed(audit.events(store.engine))]
    assert [c for c in changes if c[0].startswith("account_")] == [
        ("account_added", "cli:root", "alice"),
        ("account_disabled", "cli:root", "alice"),
    ]


def test_roles():
    reviewer = accounts.Account(id=1, name="r", role="reviewer")
    admin = accounts.Account(id=2, name="a", role="admin")
    assert {a for a in ACTIONS if can(reviewer, a)} == {"review", "see_own_history"}
    assert all(can(admin, a) for a in ACTIONS)
    assert LOCAL_ACCOUNT.is_local and all(can(LOCAL_ACCOUNT, a) for a in ACTIONS)  # local mode: as before
    with pytest.raises(ValueError, match="unknown action"):
        can(admin, "delete_everything")  # type: ignore[arg-type]


def test_audit_record_and_read(store):
    audit.record(store.engine, "alice", "reveal_identifiers", "1.2.3.4", detail={"fields": 5})
    audit.record(store.engine, "cli:bob", "calibration_change", "runs/x", ok=False)
    with Session(store.engine) as session:  # a session's event commits or rolls back with its transaction
        session.begin()
        audit.record(session, "alice", "review_edit", "1.2.3.4")
        session.rollback()
    latest, first = audit.events(store.engine)
    assert (latest.event, latest.actor, latest.ok) == ("calibration_change", "cli:bob", False)
    assert (first.event, first.target, first.detail) == ("reveal_identifiers", "1.2.3.4", {"fields": 5})
    assert first.at.tzinfo is not None and first.at <= latest.at
    assert [e.event for e in audit.events(store.engine, actor="alice")] == ["reveal_identifiers"]
    with pytest.raises(ValueError, match="not one of"):
        audit.record(store.engine, "alice", "coffee_break")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        audit.record(store.engine, "alice", "review_edit", detail={"x": float("nan")})
    assert len(audit.events(store.engine)) == 2


# ------------------------------------------------------------------------------------------- medvit users


def _users(monkeypatch, db_url: str, *argv: str, stdin: str = "") -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return cli_main(["users", *argv, "--db", db_url])


def test_users_command_reads_the_password_from_stdin_never_from_argv(db_url, monkeypatch, capsys):
    assert _users(monkeypatch, db_url, "add", "alice", "--role", "admin", stdin=PASSWORD + "\n") == 0
    assert "added admin 'alice'" in capsys.readouterr().out
    for argv in (["add", "bob", "--role", "reviewer", "--password", OTHER],
                 ["add", "bob", OTHER, "--role", "reviewer"],
                 ["add", "bob", "--role", "reviewer", f"--password={OTHER}"]):  # fmt: skip
        assert _users(monkeypatch, db_url, *argv, stdin=OTHER + "\n") == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "unrecognized arguments" in err and "\n" not in err
    assert _users(monkeypatch, db_url, "add", "bob", "--role", "reviewer", stdin="") == 2
    assert "no password on stdin" in capsys.readouterr().err
    assert _users(monkeypatch, db_url, "add", "alice", "--role", "reviewer", stdin=OTHER + "\n") == 2
    assert "already exists" in capsys.readouterr().err
    assert _users(monkeypatch, db_url, "add", "bob", "--role", "reviewer", stdin=OTHER + "\r\n") == 0
    assert _users(monkeypatch, db_url, "disable", "bob") == 0
    capsys.readouterr()
    assert _users(monkeypatch, db_url, "list") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["name", "role", "state", "created"]
    assert out[1].split()[:3] == ["alice", "admin", "active"] and out[2].split()[:3] == ["bob", "reviewer", "disabled"]
    store = ReviewStore(db_url)
    try:
        assert sign_in(store.engine, "alice", PASSWORD).name == "alice"  # the password arrived intact
        assert PASSWORD not in _database_text(store) and OTHER not in _database_text(store)
        actors = {e.actor for e in audit.events(store.engine) if e.event.startswith("account_")}
        assert len(actors) == 1 and actors.pop().startswith("cli")
    finally:
        store.close()


def test_users_command_prompts_twice_on_a_terminal(db_url, monkeypatch, capsys):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    answers = iter([PASSWORD, PASSWORD + "typo", PASSWORD, PASSWORD])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    monkeypatch.setattr(sys, "stdin", Tty())
    assert cli_main(["users", "add", "alice", "--role", "reviewer", "--db", db_url]) == 2
    assert "the two passwords differ" in capsys.readouterr().err
    assert cli_main(["users", "add", "alice", "--role", "reviewer", "--db", db_url]) == 0


def test_users_command_through_a_real_pipe(tmp_path):
    db = f"sqlite:///{tmp_path / 'r.sqlite3'}"
    env = {**os.environ, "MEDVIT_DB_URL": db}
    r = subprocess.run([sys.executable, "-m", "medvit", "users", "add", "carol", "--role", "reviewer"],
                       input=PASSWORD + "\n", capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert PASSWORD not in r.stdout + r.stderr
    store = ReviewStore(db)
    try:
        assert sign_in(store.engine, "carol", PASSWORD).role == "reviewer"
    finally:
        store.close()


# ------------------------------------------------------------------------------------------- serving beyond localhost


def _review(*argv: str) -> int:
    return cli_main(["review", *argv])


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "review.example.org"])
def test_medvit_review_refuses_to_serve_beyond_localhost_without_site_mode_and_tls(host, monkeypatch, capsys):
    monkeypatch.delenv("MEDVIT_AUTH", raising=False)
    assert _review("--address", host) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: refusing to serve on {host}") and "site mode" in line and "TLS" in line
    assert _review("--host", host, "--auth", "accounts") == 2
    line = capsys.readouterr().err.strip()
    assert "TLS (--tls-cert and --tls-key)" in line and "site mode" not in line


def test_medvit_review_serves_beyond_localhost_with_site_mode_and_tls(tmp_path, monkeypatch, capsys):
    from medvit.cli import build_parser
    from medvit.commands.review import build_command

    cert, key = self_signed_cert(tmp_path / "tls")
    monkeypatch.setenv("MEDVIT_AUTH", "accounts")  # site mode from the environment, as a service unit sets it
    cmd, env = build_command(build_parser("review").parse_args(
        ["review", "--address", "0.0.0.0", "--tls-cert", str(cert), "--tls-key", str(key)]))  # fmt: skip
    assert cmd[cmd.index("--server.address") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--server.sslCertFile") + 1] == str(cert.resolve())
    assert cmd[cmd.index("--server.sslKeyFile") + 1] == str(key.resolve())
    assert AppSettings.from_env(env).auth == "accounts"

    monkeypatch.setenv("MEDVIT_AUTH", "local")
    assert _review("--address", "0.0.0.0", "--tls-cert", str(cert), "--tls-key", str(key)) == 2
    assert "site mode" in capsys.readouterr().err
    _, other_key = self_signed_cert(tmp_path / "other")
    assert _review("--auth", "accounts", "--tls-cert", str(cert), "--tls-key", str(other_key)) == 2
    assert "not a PEM certificate and its matching private key" in capsys.readouterr().err
    assert _review("--tls-cert", str(cert)) == 2
    assert "go together" in capsys.readouterr().err
    assert _review("--tls-cert", str(cert), "--tls-key", str(tmp_path / "missing.key")) == 2
    err = capsys.readouterr().err
    assert "--tls-key" in err and "not found" in err
    for loopback in ("localhost", "127.0.0.2", "::1"):  # on this machine neither is required
        cmd, _ = build_command(build_parser("review").parse_args(["review", "--host", loopback]))
        assert "--server.sslCertFile" not in cmd


def test_site_mode_settings_travel_through_the_environment(monkeypatch):
    settings = AppSettings(auth="accounts", idle_minutes=0.5)
    back = AppSettings.from_env(settings.to_env())
    assert (back.auth, back.idle_minutes) == ("accounts", 0.5)
    assert AppSettings.from_env({}).auth == "local"
    for env, message in (({"MEDVIT_AUTH": "ldap"}, "is not one of local, accounts"),
                         ({"MEDVIT_SESSION_IDLE_MINUTES": "0"}, "more than 0"),
                         ({"MEDVIT_SESSION_IDLE_MINUTES": "soon"}, "not a number")):  # fmt: skip
        with pytest.raises(MedvitError, match=message):
            AppSettings.from_env(env)
    monkeypatch.setenv("MEDVIT_AUTH", "ldap")
    assert _review() == 2


def test_the_cli_stays_torch_free_with_the_users_command():
    code = (
        "import contextlib, sys\nfrom medvit.cli import main\n"
        "with contextlib.suppress(SystemExit):\n    main(['users', 'list', '--help'])\nprint('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert r.stdout.strip().splitlines()[-1] == "False", r.stdout + r.stderr
