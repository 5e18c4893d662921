"""`medvit predict` over a folder vs model-only throughput (the baseline), with the same backend.

Model-only: the backend's forward on already-preprocessed batches (no decoding, no CSV). Folder: the
real `predict_files` path (parallel decoding in DataLoader workers, calibration, incremental CSV). The
ratio folder / model-only is the issue 6 target (>= 0.9).

    python benchmarks/predict_throughput.py [--run RUN_DIR | --random-base] [--images 64] [--backend auto]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from _random_run import random_init_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="run folder (default: $MEDVIT_RUN, else the demo model)")
    parser.add_argument("--random-base", action="store_true", help="use a random-init DeiT3-B/16-384 run instead")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/cxr14-dev/images"))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)

    import torch

    from medvit.data.dicom import read_image
    from medvit.data.files import find_images
    from medvit.inference.batch import CsvSink, predict_files
    from medvit.inference.predictor import Predictor

    with tempfile.TemporaryDirectory(prefix="medvit-throughput-") as tmp:
        tmp_dir = Path(tmp)
        base = {"name": "deit3_base_patch16_384", "freeze_stem": False, "freeze_blocks": 0}
        run = random_init_run(base, tmp_dir / "run") if args.random_base else args.run
        predictor = Predictor.from_dir(run, backend=args.backend)
        folder = tmp_dir / "in"
        folder.mkdir()
        for p in sorted(Path(args.data).iterdir())[: args.images]:
            (folder / p.name).symlink_to(p)
        paths = find_images([folder])

        x = torch.stack([predictor.preprocess(read_image(p)) for p in paths])
        predictor.backend(x[: args.batch_size])  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(x), args.batch_size):
            predictor.backend(x[i : i + args.batch_size])
        model_only = len(x) / (time.perf_counter() - t0)

        sink = CsvSink(tmp_dir / "preds.csv", append=False)
        summary = predict_files(predictor, paths, sink, batch_size=args.batch_size, workers=args.workers,
                                progress=False)
        sink.close()
        folder_rate = summary.n_predicted / summary.seconds
        report = {
            "baseline": "model-only forward on preprocessed batches",
            "run": str(predictor.info.run_dir) if not args.random_base else "random-init deit3_base_patch16_384",
            "backend": predictor.backend.name, "images": len(paths), "batch_size": args.batch_size,
            "workers": args.workers if args.workers is not None else min(2, os.cpu_count() or 1),
            "model_only_images_per_s": model_only, "predict_images_per_s": folder_rate,
            "ratio": folder_rate / model_only, "errors": summary.n_errors,
            "load_avg_1m": os.getloadavg()[0], "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
