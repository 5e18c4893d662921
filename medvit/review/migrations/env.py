"""Alembic environment for the review database (see medvit.review_store.migrate).

The store passes its own open connection in ``config.attributes["connection"]`` so migrations run inside
the same transaction (and SQLite pragmas) as the store. For the ``alembic`` command line, a URL is taken
from ``sqlalchemy.url`` or ``$MEDVIT_DB_URL``; see docs/app.md.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

import medvit.review.scoring  # noqa: F401 - registers the pacs_instances table (migration 0002) on Base
from medvit.review.store import default_db_url
from medvit.review.tables import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or default_db_url()


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
elif (conn := config.attributes.get("connection")) is not None:
    _run(conn)
else:
    engine = create_engine(_url())
    with engine.begin() as connection:
        _run(connection)
    engine.dispose()
