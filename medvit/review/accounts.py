"""Site-mode accounts: who may sign in to the review app, with which role, and the lockout that slows guessing.

Passwords are hashed with argon2id (argon2-cffi's `PasswordHasher`, RFC 9106 low-memory profile); only the hash
is stored. A sign-in costs one hash verification whatever happens: an unknown name is checked against a dummy
hash, and a locked or disabled account is verified too, so the time taken does not tell which names exist.
After `MAX_FAILURES` consecutive failures an account is locked for `LOCK_MINUTES`; while locked no password is
tried, so the lock cannot be used to test guesses. Every sign-in and account change is audited
(`medvit.review.audit`); the name typed for an unknown account is not stored (people type passwords there).
"""

from __future__ import annotations

import functools
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, get_args

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from medvit.errors import MedvitError
from medvit.review import audit
from medvit.review.tables import REVIEWER_MAX, UserRow

_log = logging.getLogger(__name__)

Role = Literal["reviewer", "admin"]
ROLES: tuple[str, ...] = get_args(Role)
Action = Literal[
    "review",  # record verdicts on an image
    "see_own_history",
    "see_all_history",
    "see_monitoring",
    "recalibrate",
    "reveal_identifiers",
]
ACTIONS: tuple[str, ...] = get_args(Action)
_REVIEWER_ACTIONS = frozenset({"review", "see_own_history"})

MAX_FAILURES = 5  # consecutive failed sign-ins before the account locks
LOCK_MINUTES = 15
PASSWORD_MIN = 8  # NIST SP 800-63B's minimum for a memorised secret
PASSWORD_MAX = 1024  # argon2 pre-hashes any length; the cap only bounds the work an attacker can ask for
_NAME = re.compile(r"[\w.@' -]+")  # letters (any script), digits and . @ ' - _ space
REFUSED = "sign-in refused: wrong account name or password"

_hasher = PasswordHasher()


@dataclass(frozen=True)
class Account:
    """Someone using the app: a site account, or the local pseudo-user of local mode (`id` None)."""

    id: int | None
    name: str
    role: Role
    disabled: bool = False
    failed_signins: int = 0
    locked_until: datetime | None = None  # UTC
    created_at: datetime | None = None

    @property
    def is_local(self) -> bool:
        return self.id is None


# Local mode has no sign-in: whoever runs the app on their own machine may do everything, as before site mode.
LOCAL_ACCOUNT = Account(id=None, name="local", role="admin")


def can(account: Account, action: Action) -> bool:
    """Whether `account` may do `action`: reviewers review and see their own history; admins do everything."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
    if account.disabled:
        return False
    return account.role == "admin" or action in _REVIEWER_ACTIONS


def add_account(engine: Engine, name: str, password: str, role: str, *, actor: str) -> Account:
    """Create an account (names are unique regardless of case) and audit it as `actor`.

    Raises:
        MedvitError: the name, role or password is not acceptable, or the name is taken.
    """
    name = check_name(name)
    if role not in ROLES:
        raise MedvitError(f"role {role!r} is not one of {', '.join(ROLES)}")
    _check_password(password, name)
    row = UserRow(name=name, password_hash=_hasher.hash(password), role=role, disabled=False, failed_signins=0,
                  created_at=datetime.now(UTC))  # fmt: skip
    try:
        with Session(engine) as session, session.begin():
            if _find(session, name) is not None:
                raise MedvitError(f"account {name!r} already exists")
            session.add(row)
            session.flush()
            audit.record(session, actor, "account_added", name, detail={"role": role})
            account = _to_account(row)
    except IntegrityError as e:  # another process added the same name between the check and the insert
        raise MedvitError(f"account {name!r} already exists") from e
    _log.info("account %s added (%s) by %s", name, role, actor)
    return account


def disable_account(engine: Engine, name: str, *, actor: str) -> Account:
    """Disable an account so it can no longer sign in (its reviews stay); a no-op if it already is.

    Raises:
        MedvitError: there is no such account.
    """
    with Session(engine) as session, session.begin():
        row = _find(session, name.strip(), lock=True)
        if row is None:
            raise MedvitError(f"no account named {name.strip()!r}; `medvit users list` shows them")
        if not row.disabled:
            row.disabled = True
            audit.record(session, actor, "account_disabled", row.name)
            _log.info("account %s disabled by %s", row.name, actor)
        return _to_account(row)


def list_accounts(engine: Engine) -> list[Account]:
    """Every account, by name."""
    with Session(engine) as session:
        return [_to_account(r) for r in session.scalars(select(UserRow).order_by(UserRow.name))]


def get_account(engine: Engine, account_id: int) -> Account | None:
    """The account's current state (the app re-reads it on every page run, so disabling takes effect at once)."""
    with Session(engine) as session:
        row = session.get(UserRow, account_id)
        return None if row is None else _to_account(row)


def sign_in(
    engine: Engine,
    name: str,
    password: str,
    *,
    now: datetime | None = None,
    max_failures: int = MAX_FAILURES,
    lock_minutes: float = LOCK_MINUTES,
) -> Account:
    """Check a name and password, count failures, lock after `max_failures`, and audit the attempt.

    Raises:
        MedvitError: the sign-in is refused; the message says why only to the extent that it does not help
            someone guessing (unknown name and wrong password read the same).
    """
    now = now or datetime.now(UTC)
    name = (name or "").strip()
    password = password or ""
    with Session(engine) as session, session.begin():
        row = _find(session, name, lock=True) if 0 < len(name) <= REVIEWER_MAX else None
        if row is None:
            _verify(_dummy_hash(), password)  # the same work as for a real account
            audit.record(session, None, "signin_failed", None, ok=False, detail={"reason": "unknown_account"})
            refusal: str | None = REFUSED
        else:
            refusal = _check(session, row, password, now, max_failures, lock_minutes)
        account = None if row is None else _to_account(row)
    if refusal is not None:
        raise MedvitError(refusal)
    assert account is not None
    _log.info("%s signed in", account.name)
    return account


def _check(
    session: Session, row: UserRow, password: str, now: datetime, max_failures: int, lock_minutes: float
) -> str | None:
    """Update the row's failure count or lock for one attempt; the refusal message, or None when signed in."""
    good = _verify(row.password_hash, password)  # always, so a locked or disabled account costs the same time
    locked_until = _utc(row.locked_until)
    if locked_until is not None and locked_until > now:
        audit.record(session, None, "signin_failed", row.name, ok=False, detail={"reason": "locked"})
        return (
            f"sign-in refused: the account is locked after {max_failures} failed sign-ins until "
            f"{locked_until:%H:%M} UTC; try again then, or ask an admin"
        )
    if not good:
        row.failed_signins = (row.failed_signins or 0) + 1
        detail: dict[str, object] = {"reason": "wrong_password", "failures": row.failed_signins}
        message = REFUSED
        if row.failed_signins >= max_failures:
            row.locked_until = now + timedelta(minutes=lock_minutes)
            row.failed_signins = 0
            detail["locked_minutes"] = lock_minutes
            message += f"; after {max_failures} failures the account is locked for {lock_minutes:g} minutes"
            _log.warning("account %s locked after %d failed sign-ins", row.name, max_failures)
        audit.record(session, None, "signin_failed", row.name, ok=False, detail=detail)
        return message
    if row.disabled:
        audit.record(session, None, "signin_failed", row.name, ok=False, detail={"reason": "disabled"})
        return f"sign-in refused: the account {row.name!r} is disabled; ask an admin"
    row.failed_signins = 0
    row.locked_until = None
    if _hasher.check_needs_rehash(row.password_hash):  # hashed with older parameters: upgrade it now
        row.password_hash = _hasher.hash(password)
    audit.record(session, row.name, "signin_ok", row.name)
    return None


def check_name(name: str) -> str:
    """An account name, stripped; letters, digits, spaces and . @ ' - _ only, at most 120 characters.

    Raises:
        MedvitError: the name is empty, too long or has other characters.
    """
    name = (name or "").strip()
    if not name:
        raise MedvitError("the account name is empty")
    if len(name) > REVIEWER_MAX:
        raise MedvitError(f"the account name is {len(name)} characters long (at most {REVIEWER_MAX})")
    if not _NAME.fullmatch(name):
        raise MedvitError(f"account name {name!r}: use letters, digits, spaces and . @ ' - _ only")
    return name


def _check_password(password: str, name: str) -> None:
    if len(password) < PASSWORD_MIN:
        raise MedvitError(f"the password is {len(password)} characters long; at least {PASSWORD_MIN} are needed")
    if len(password) > PASSWORD_MAX:
        raise MedvitError(f"the password is longer than {PASSWORD_MAX} characters")
    if password.strip().lower() == name.lower():
        raise MedvitError("the password must not be the account name")


def _find(session: Session, name: str, *, lock: bool = False) -> UserRow | None:
    """The account whose name matches regardless of case; `lock` holds its row until the transaction ends."""
    query = select(UserRow).where(func.lower(UserRow.name) == name.lower())
    return session.scalar(query.with_for_update() if lock else query)


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except VerifyMismatchError:
        return False
    except (VerificationError, InvalidHashError):
        _log.error("a stored password hash is not a valid argon2 hash; the account cannot sign in")
        return False


@functools.cache
def _dummy_hash() -> str:
    """A hash of a random secret, verified for unknown names so that they take as long as real ones."""
    return _hasher.hash(secrets.token_urlsafe(16))


def _utc(value: datetime | None) -> datetime | None:
    return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)  # SQLite drops the timezone


def _to_account(r: UserRow) -> Account:
    return Account(id=r.id, name=r.name, role=r.role, disabled=bool(r.disabled),  # type: ignore[arg-type]
                   failed_signins=r.failed_signins or 0, locked_until=_utc(r.locked_until),
                   created_at=_utc(r.created_at))  # fmt: skip
