"""`medvit predict [--run RUN_DIR] [--backend NAME] INPUT... [--out preds.csv] [--resume]`.

Per image and finding: raw probability, calibrated probability, threshold, flag. Without --out the
tables are printed; with --out rows are appended per batch (long format, one row per image x finding,
one error row per unreadable or unsuitable file); a single bad file without --out is an error (exit 2).
The model defaults to $MEDVIT_RUN, then the demo. Under `torchrun --nproc_per_node N -m medvit predict ...
--out preds.csv` each rank predicts its shard into a part file and rank 0 merges them (medvit.inference.shard).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from medvit.inference import AUTO, BACKENDS

if TYPE_CHECKING:
    from medvit.inference.shard import Shard


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="DICOM/PNG/JPEG files or folders (recursive)")
    parser.add_argument("--run", "--run-dir", dest="run", default=None,
                        help="run folder (default: $MEDVIT_RUN, else the demo model); under torchrun write --run-dir, "
                             "since torchrun takes --run for its own --run-path")
    parser.add_argument("--backend", default=AUTO, choices=[AUTO, *BACKENDS],
                        help="inference engine; auto = fastest one matching fp32 here (default; $MEDVIT_BACKEND)")
    parser.add_argument("--out", default=None, help="write rows to this CSV incrementally instead of printing")
    parser.add_argument("--resume", action="store_true", help="append to --out, skipping files already in it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: min(2, CPUs))")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from medvit.data.files import find_images
    from medvit.errors import MedvitError
    from medvit.inference.batch import CsvSink, done_files, predict_files
    from medvit.inference.predictor import Predictor
    from medvit.inference.shard import Shard, stale_parts

    if args.batch_size < 1:
        raise MedvitError("--batch-size must be >= 1")
    out = Path(args.out) if args.out else None
    if out is None and args.resume:
        raise MedvitError("--resume needs --out (the CSV to continue)")
    if out is not None and out.exists() and not (args.resume or args.overwrite):
        raise MedvitError(f"{out} exists: pass --resume to continue it or --overwrite to replace it")
    shard = Shard.from_env()
    if shard.enabled and out is None:
        raise MedvitError("under torchrun, predict needs --out: each rank writes its part of that CSV")
    if out is not None and stale_parts(out) and not (args.resume or args.overwrite):
        raise MedvitError(f"{out.name} has part files of an interrupted torchrun job: pass --resume or --overwrite")
    paths = find_images(args.inputs)
    if not paths:
        raise MedvitError(f"no DICOM/PNG/JPEG files found in {' '.join(args.inputs)}")
    if shard.enabled and out is not None:
        return _run_shard(args, shard, paths, out)
    predictor = Predictor.from_dir(args.run, backend=args.backend)
    if out is None and len(paths) == 1:  # one image on screen: a bad file is the command's error (exit 2)
        from medvit.data.dicom import read_image

        pred = predictor.predict(read_image(paths[0], min_side=predictor.input_side))
        print(pred.table.to_string(index=False, float_format="%.3f"))
        for warning in pred.warnings:
            print(f"warning: {warning}")
        print(f"calibration {predictor.calibration_version} on {predictor.backend.name}", file=sys.stderr)
        return 0
    if out is not None and args.overwrite:
        for part in stale_parts(out):
            part.unlink()
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
                print(table.drop(columns=["file", "error", "warning"]).to_string(index=False, float_format="%.3f"))
                if table["warning"].fillna("").astype(bool).any():
                    print(f"warning: {table['warning'].iloc[0]}")
    print(
        f"{summary.n_predicted} predicted, {summary.n_errors} error row(s), {summary.n_skipped} skipped (resume); "
        f"{summary.images_per_s:.2f} images/s on {predictor.backend.name}, calibration {predictor.calibration_version}"
        + (f" -> {out}" if out else ""),
        file=sys.stderr,
    )
    return 0


def _run_shard(args: argparse.Namespace, shard: Shard, paths: list[Path], out: Path) -> int:
    """One rank of a torchrun job: predict this rank's files into its part, then rank 0 merges all parts."""
    from medvit.inference.batch import CsvSink, done_files, predict_files
    from medvit.inference.predictor import Predictor
    from medvit.inference.shard import merge_parts
    from medvit.train.distributed import barrier, cleanup, init_distributed

    dist = init_distributed()
    try:
        part = shard.part(out)
        if args.overwrite:
            part.unlink(missing_ok=True)
        skip = (done_files(part) | done_files(out)) if args.resume else set()
        predictor = Predictor.from_dir(args.run, backend=args.backend)
        sink = CsvSink(part, append=args.resume)
        try:
            summary = predict_files(predictor, shard.select(paths), sink, skip=skip, batch_size=args.batch_size,
                                    workers=args.workers, progress=sys.stderr.isatty() and shard.rank == 0)
        finally:
            sink.close()
        print(f"rank {shard.rank}/{shard.world_size}: {summary.n_predicted} predicted, {summary.n_errors} error "
              f"row(s), {summary.n_skipped} skipped; {summary.images_per_s:.2f} images/s", file=sys.stderr)
        barrier(dist)  # every part is complete before rank 0 reads them
        if shard.rank == 0:
            rows = merge_parts(out, paths, shard.world_size, keep_existing=args.resume)
            print(f"merged {shard.world_size} parts: {rows} rows -> {out}", file=sys.stderr)
    finally:
        cleanup(dist)
    return 0
