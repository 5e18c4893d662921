"""`medvit watch --dicomweb URL [--once] [--since YYYYMMDD] [--interval SECONDS] [--run RUN] [--db URL]
[--batch-size N] [--secondary-capture]`.

Scores the PACS's new CR/DX instances and stores a DICOM SR for each back into it (see `medvit.pacs.watch`);
with `--secondary-capture` also the saliency overlay as an image in the SR's series (`medvit.pacs.sc`).
Credentials: $MEDVIT_DICOMWEB_USER / $MEDVIT_DICOMWEB_PASSWORD, or $MEDVIT_DICOMWEB_TOKEN (bearer).
`--once` makes one pass: exit 0 when every instance is scored or refused, 1 when some failed (they are
retried by the next run), 2 with one line when the PACS cannot be reached or refuses the credentials.
Without `--once` it runs until interrupted, backing off while the PACS is away.
"""

from __future__ import annotations

import argparse
import re

from medvit.inference import AUTO, BACKENDS

URL_ENV = "MEDVIT_DICOMWEB_URL"


def _date(value: str) -> str:
    if not re.fullmatch(r"(19|20)\d{2}(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a date as YYYYMMDD")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    import os

    parser.add_argument("--dicomweb", metavar="URL", default=os.environ.get(URL_ENV),
                        help=f"DICOMweb root of the PACS, e.g. http://pacs:8042/dicom-web (default: ${URL_ENV})")
    parser.add_argument("--once", action="store_true", help="one pass, then exit (0: all scored or refused)")
    parser.add_argument("--since", type=_date, default=None, help="only studies on or after this date (YYYYMMDD)")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between passes (default 60)")
    parser.add_argument("--run", default=None, help="run folder (default: $MEDVIT_RUN, else the demo model)")
    parser.add_argument("--backend", default=AUTO, choices=[AUTO, *BACKENDS], help="inference engine (default auto)")
    parser.add_argument("--db", default=None, help="review database URL (default: $MEDVIT_DB_URL, else SQLite)")
    parser.add_argument("--max-attempts", type=int, default=5, help="retries of a failed instance (default 5)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="instances claimed, retrieved concurrently, scored and stored together (default 8)")
    parser.add_argument("--secondary-capture", action="store_true",
                        help="also store the saliency overlay as a Secondary Capture in the SR's series")


def run(args: argparse.Namespace) -> int:
    import sys

    from medvit.errors import MedvitError
    from medvit.inference.predictor import Predictor
    from medvit.pacs.client import PacsClient
    from medvit.pacs.queue import status_counts
    from medvit.pacs.watch import Watcher
    from medvit.review.store import ReviewStore

    if not args.dicomweb:
        raise MedvitError(f"no PACS given: pass --dicomweb URL or set ${URL_ENV}")
    if args.interval <= 0 or args.max_attempts < 1 or args.batch_size < 1:
        raise MedvitError("--interval must be > 0, --max-attempts and --batch-size >= 1")
    client = PacsClient(args.dicomweb)
    client.ping()  # an unreachable PACS or refused credentials: one line, before loading the model
    store = ReviewStore(args.db)
    try:
        watcher = Watcher(client, Predictor.from_dir(args.run, backend=args.backend), store.engine,
                          since=args.since, max_attempts=args.max_attempts, secondary_capture=args.secondary_capture,
                          batch_size=args.batch_size)
        if not args.once:
            watcher.serve(args.interval)
            return 0
        summary = watcher.run_pass()
        from sqlalchemy.orm import Session

        with Session(store.engine) as session:
            counts = status_counts(session)
    finally:
        store.close()
    print(f"{summary.scored} scored, {summary.refused} refused, {summary.failed} failed this pass; "
          f"database: {counts['scored']} scored, {counts['refused']} refused, {counts['failed']} failed, "
          f"{counts['pending']} pending", file=sys.stderr)
    return 0 if counts["failed"] == 0 and counts["pending"] == 0 else 1
