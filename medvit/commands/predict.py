"""`medvit predict [--run RUN_DIR] [--backend NAME] INPUT... [--out preds.csv] [--resume]`.

Per image and finding: raw probability, calibrated probability, threshold, flag. Without --out the
tables are printed; with --out rows are appended per batch (long format, one row per image x finding,
one error row per unreadable or unsuitable file); a single bad file without --out is an error (exit 2).
The model defaults to $MEDVIT_RUN, then the demo.
"""

from __future__ import annotations

import argparse
import sys

from medvit.inference.engines import AUTO, BACKENDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="DICOM/PNG/JPEG files or folders (recursive)")
    parser.add_argument("--run", default=None, help="run folder (default: $MEDVIT_RUN, else the demo model)")
    parser.add_argument("--backend", default=AUTO, choices=[AUTO, *BACKENDS],
                        help="inference engine; auto = fastest one matching fp32 here (default; $MEDVIT_BACKEND)")
    parser.add_argument("--out", default=None, help="write rows to this CSV incrementally instead of printing")
    parser.add_argument("--resume", action="store_true", help="append to --out, skipping files already in it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: min(2, CPUs))")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import pandas as pd

    from medvit.errors import MedvitError
    from medvit.inference.batch import CsvSink, done_files, find_images, predict_files
    from medvit.inference.predictor import Predictor

    if args.batch_size < 1:
        raise MedvitError("--batch-size must be >= 1")
    out = Path(args.out) if args.out else None
    if out is None and args.resume:
        raise MedvitError("--resume needs --out (the CSV to continue)")
    if out is not None and out.exists() and not (args.resume or args.overwrite):
        raise MedvitError(f"{out} exists: pass --resume to continue it or --overwrite to replace it")
    paths = find_images(args.inputs)
    if not paths:
        raise MedvitError(f"no DICOM/PNG/JPEG files found in {' '.join(args.inputs)}")
    predictor = Predictor.from_dir(args.run, backend=args.backend)
    if out is None and len(paths) == 1:  # one image on screen: a bad file is the command's error (exit 2)
        from medvit.data.dicom import read_image

        table = predictor.predict(read_image(paths[0])).table
        print(table.to_string(index=False, float_format="%.3f"))
        return 0
    skip = done_files(out) if (out is not None and args.resume) else set()

    printed: list[pd.DataFrame] = []
    sink = CsvSink(out, append=args.resume) if out is not None else printed.append
    try:
        summary = predict_files(predictor, paths, sink, skip=skip, batch_size=args.batch_size, workers=args.workers,
                                progress=sys.stderr.isatty())
    finally:
        if isinstance(sink, CsvSink):
            sink.close()
    for rows in printed:
        for file, table in rows.groupby("file", sort=False):
            print(f"# {file}")
            if table["error"].fillna("").astype(bool).any():
                print(f"error: {table['error'].iloc[0]}")
            else:
                print(table.drop(columns=["file", "error"]).to_string(index=False, float_format="%.3f"))
    print(
        f"{summary.n_predicted} predicted, {summary.n_errors} error row(s), {summary.n_skipped} skipped (resume); "
        f"{summary.images_per_s:.2f} images/s on {predictor.backend.name}" + (f" -> {out}" if out else ""),
        file=sys.stderr,
    )
    return 0
