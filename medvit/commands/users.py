"""`medvit users add|list|disable`: the site-mode accounts in the review database.

A password is read from a prompt (typed twice) or, when stdin is not a terminal, from its first line; never from
the command line, where it would stay in the shell history and show in `ps` to every user of the machine.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TextIO

from medvit.errors import MedvitError

if TYPE_CHECKING:
    from medvit.review.accounts import Account


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from medvit.review.accounts import ROLES

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", help="review database URL (default: $MEDVIT_DB_URL, else SQLite in the user data dir)")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=type(parser))
    add = sub.add_parser("add", parents=[common], help="create an account (password from a prompt or stdin)")
    add.add_argument("name", help="account name (letters, digits, spaces and . @ ' - _)")
    add.add_argument("--role", choices=ROLES, required=True, help="reviewer: reviews; admin: also monitoring, "
                     "recalibration and patient identifiers")  # fmt: skip
    sub.add_parser("list", parents=[common], help="list the accounts and their state")
    disable = sub.add_parser("disable", parents=[common], help="stop an account from signing in (reviews stay)")
    disable.add_argument("name")


def read_password(stdin: TextIO | None) -> str:
    """The new password: prompted twice on a terminal, else the first line of stdin.

    Raises:
        MedvitError: the two prompts differ, or stdin has no line.
    """
    if stdin is not None and stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Password again: ") != first:
            raise MedvitError("the two passwords differ; nothing was changed")
        return first
    line = stdin.readline() if stdin is not None else ""
    if not line.strip():
        raise MedvitError("no password on stdin: pipe it as one line, or run in a terminal to be prompted")
    return line.rstrip("\r\n")


def _actor() -> str:
    """Who ran the command, for the audit trail: the operating-system login."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name in this environment (some containers)
        return "cli"


def run(args: argparse.Namespace) -> int:
    from medvit.review.accounts import add_account, disable_account, list_accounts
    from medvit.review.store import ReviewStore

    password = read_password(sys.stdin) if args.action == "add" else ""  # before the database, so a typo costs less
    store = ReviewStore(args.db)
    try:
        if args.action == "add":
            account = add_account(store.engine, args.name, password, args.role, actor=_actor())
            print(f"added {account.role} {account.name!r} to {store.display_url}")
        elif args.action == "disable":
            account = disable_account(store.engine, args.name, actor=_actor())
            print(f"{account.name!r} is disabled: it can no longer sign in")
        else:
            _print_accounts(list_accounts(store.engine))
    finally:
        store.close()
    return 0


def _print_accounts(accounts: list[Account]) -> None:
    if not accounts:
        print("no accounts yet: `medvit users add NAME --role admin` creates one")
        return
    now = datetime.now(UTC)
    rows = [("name", "role", "state", "created")]
    for a in accounts:
        state = "disabled" if a.disabled else "active"
        if a.locked_until is not None and a.locked_until > now:
            state += f", locked until {a.locked_until:%Y-%m-%d %H:%M} UTC"
        created = f"{a.created_at:%Y-%m-%d %H:%M}" if a.created_at else ""
        rows.append((a.name, a.role, state, created))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
