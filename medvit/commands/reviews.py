"""`medvit reviews import --run RUN --images DIR CSV [--db URL]` and `medvit reviews export [--db URL] [--out CSV]`.

Import brings in reviews made elsewhere (columns image, finding, present, reviewer, reviewed_at), scoring each
image with the run's model; all rows or none are stored. Export writes the same columns back. See
`medvit.review.imports`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", metavar="URL", help="review database (default: $MEDVIT_DB_URL, else the local SQLite)")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=type(parser))
    imp = sub.add_parser("import", parents=[common], help="store reviews from a CSV, scoring each image with the run")
    imp.add_argument("csv", type=Path, metavar="CSV", help="columns: image, finding, present, reviewer, reviewed_at")
    imp.add_argument("--run", type=Path, metavar="RUN_DIR", help="the model (default: $MEDVIT_RUN, else the demo)")
    imp.add_argument("--images", type=Path, required=True, metavar="DIR", help="folder the `image` column is under")
    imp.add_argument("--backend", default="auto", metavar="NAME", help="inference engine (default: auto)")
    exp = sub.add_parser("export", parents=[common], help="write the reviews as CSV in the import columns")
    exp.add_argument("--out", type=Path, metavar="CSV", help="file to write (default: standard output)")
    exp.add_argument("--run", type=Path, metavar="RUN_DIR", help="only the reviews of this run's weights")


def run(args: argparse.Namespace) -> int:
    from medvit.review.store import ReviewStore

    store = ReviewStore(args.db)
    try:
        if args.action == "import":
            from medvit.inference.predictor import Predictor
            from medvit.review.imports import import_reviews

            summary = import_reviews(args.csv, args.images, Predictor.from_dir(args.run, backend=args.backend), store)
            print(json.dumps(summary.__dict__))
            return 0
        from medvit.review.imports import export_reviews
        from medvit.review.recalibrate import run_identity

        text = export_reviews(store, run_identity(args.run)[1] if args.run else None)
        if args.out is None:
            sys.stdout.write(text)
        else:
            from medvit._io import atomic_write_bytes

            atomic_write_bytes(args.out, text.encode())
            print(f"{text.count(chr(10)) - 1} rows -> {args.out}", file=sys.stderr)
        return 0
    finally:
        store.close()
