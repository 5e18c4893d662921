"""`medvit prepare --labels CSV --images DIR --out CACHE [--size 512]`: decode once into a uint8 PNG cache.

Train or evaluate on the cache afterwards with `data.labels_csv: CACHE/manifest.csv` and
`data.images_root: CACHE` (the manifest is the labels CSV with its image column pointing at the cache).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", required=True, help="labels CSV (NIH Data_Entry or wide format)")
    parser.add_argument("--images", required=True, help="folder the CSV's image paths are relative to")
    parser.add_argument("--out", required=True, help="cache folder (created; re-running resumes)")
    parser.add_argument("--size", type=int, default=512, help="longest side of the cached images (never enlarged)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: min(4, CPUs))")


def run(args: argparse.Namespace) -> int:
    import sys

    from medvit.data.cache import prepare_cache

    result = prepare_cache(args.labels, args.images, args.out, size=args.size, workers=args.workers,
                           progress=sys.stderr.isatty())
    print(f"{result.manifest}: {result.n_images - result.n_errors} images "
          f"({result.n_decoded} decoded now, {result.n_reused} reused, {result.n_errors} errors)")
    return 0 if result.n_errors == 0 else 1
