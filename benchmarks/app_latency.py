"""Upload -> findings table latency of the review app, through the app's own code path.

Times `ReviewService.analyze` (what apps/review.py calls for every new file) plus `findings_table`
(the table it draws), split into decode / preprocess / forward / calibrate / overhead, and compares it
with the named baseline "one decode + one forward": `read_image` + the backend's forward on the same
input, timed in isolation. A ratio near 1.0 means the app adds little beyond those two steps.
The model is loaded once, as in the app (st.cache_resource); each timed pass uses an empty cache
(a new upload), and a last pass shows the cached re-run (same file hash).

    python benchmarks/app_latency.py [--run RUN_DIR] [--file IMAGE] [--repeats 10] [--backend auto]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="run folder (default: $MEDVIT_RUN, else medvit/resources/demo)")
    parser.add_argument("--file", default=None, help="image to upload (default: RG1_UNCI.dcm from pydicom-data)")
    parser.add_argument("--repeats", type=int, default=10, help="timed uploads (each with an empty cache)")
    parser.add_argument("--backend", default="auto", help="predictor backend (default auto, as in the app)")
    args = parser.parse_args(argv)

    import torch

    from medvit.data.dicom import read_image
    from medvit.inference.predictor import Predictor, resolve_run_dir
    from medvit.review.service import ReviewService, findings_table
    from medvit.review.settings import default_example

    path = Path(args.file) if args.file else default_example()
    if path is None:
        parser.error("no --file given and pydicom-data is not installed")
    data = path.read_bytes()

    t0 = time.perf_counter()
    predictor = Predictor.from_dir(resolve_run_dir(args.run), backend=args.backend)
    load_ms = _ms(t0)
    ReviewService(predictor).analyze(data, path.name)  # warm-up: first-call allocations, lazy imports

    steps = ("decode", "preprocess", "forward", "calibrate", "table", "overhead", "total")
    runs: dict[str, list[float]] = {s: [] for s in steps}
    baseline: list[float] = []
    for _ in range(args.repeats):
        service = ReviewService(predictor)  # empty cache: a new upload
        t0 = time.perf_counter()
        analysis = service.analyze(data, path.name)
        t1 = time.perf_counter()
        findings_table(analysis.prediction)
        table_ms = _ms(t1)
        total = _ms(t0)
        for step in ("decode", "preprocess", "forward", "calibrate"):
            runs[step].append(analysis.timings_ms.get(step, 0.0))
        runs["table"].append(table_ms)
        runs["total"].append(total)
        runs["overhead"].append(total - sum(runs[s][-1] for s in ("decode", "preprocess", "forward", "calibrate",
                                                                     "table")))  # fmt: skip

        t0 = time.perf_counter()  # baseline: one decode + one forward (and the resize feeding it), nothing else
        image = read_image(data)
        predictor.backend(predictor.transform(image.pixels).unsqueeze(0))
        baseline.append(_ms(t0))

    t0 = time.perf_counter()
    service.analyze(data, path.name)
    cached_ms = _ms(t0)

    info = predictor.info
    size = "x".join(str(v) for v in info.preprocessing["input_size"][1:])
    print(f"review app upload -> findings table: {path.name} ({len(data) / 2**20:.1f} MB, {analysis.image.meta.columns}"
          f"x{analysis.image.meta.rows} px), model {info.model_name} @ {size}, backend {predictor.backend.name}, "
          f"torch threads {torch.get_num_threads()}, {args.repeats} uploads")  # fmt: skip
    print(f"model load (once per server, st.cache_resource): {load_ms:8.1f} ms")
    print(f"{'step':<12} {'median ms':>10} {'min ms':>8} {'max ms':>8}")
    for step in steps:
        v = runs[step]
        print(f"{step:<12} {statistics.median(v):10.1f} {min(v):8.1f} {max(v):8.1f}")
    base = statistics.median(baseline)
    total = statistics.median(runs["total"])
    print(f"baseline 'one decode + one forward' (read_image + transform + backend forward): {base:.1f} ms median")
    print(f"app / baseline: {total / base:.2f}x   (overhead beyond decode+forward: {total - base:.1f} ms)")
    print(f"cached re-run of the same file (hash lookup): {cached_ms:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
