"""The shipped demo against an earlier demo (issue 15: "at the current speed or faster"), in one interleaved run.

The earlier demo's run folder is read from git (default: the single-ViT demo before the fold ensemble, commit
b644551^) into a temp folder. Both are served by `Predictor.from_dir(..., backend)` (default `auto`, as the app), and
`Predictor.predict(read_image(...))` is timed per image on 10 dev PNGs (untagged: the out-of-distribution check runs)
and on pydicom-data's RG1_UNCI chest CR (tagged CHEST: no check), alternating the two models round by round.

    python benchmarks/demo_speed.py [--old-rev b644551^] [--rounds 5] [--backend auto]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

DEMO = "medvit/resources/demo"


def checkout_run(rev: str, folder: Path) -> Path:
    """The demo run folder as it was at `rev`."""
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{DEMO}"], check=True, capture_output=True,
                           text=True).stdout.split()
    for name in names:
        data = subprocess.run(["git", "show", f"{rev}:{DEMO}/{name}"], check=True, capture_output=True).stdout
        (folder / name).write_bytes(data)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-rev", default="b644551^")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--data", default="../shared/data/cxr14-dev")
    args = parser.parse_args(argv)

    from pydicom.data import get_testdata_file

    from medvit._platform import cpu_model, isa_flags
    from medvit.data.dicom import read_image
    from medvit.inference.predictor import Predictor

    with tempfile.TemporaryDirectory(prefix="medvit-olddemo-") as tmp:
        predictors = {"old": Predictor.from_dir(checkout_run(args.old_rev, Path(tmp)), backend=args.backend),
                      "new": Predictor.from_dir(None, backend=args.backend)}
        files = {"png": sorted(Path(args.data).rglob("*.png"))[:10], "dicom": [get_testdata_file("RG1_UNCI.dcm")] * 3}
        load_start = os.getloadavg()[0]
        ms: dict[tuple[str, str], list[float]] = {(k, f): [] for k in predictors for f in files}
        engines: dict[tuple[str, str], set[str]] = {key: set() for key in ms}
        for _ in range(args.rounds):
            for kind, paths in files.items():
                for name, p in predictors.items():
                    t0 = time.perf_counter()
                    for path in paths:
                        engines[(name, kind)].add(p.predict(read_image(path, min_side=p.input_side)).backend)
                    ms[(name, kind)].append((time.perf_counter() - t0) / len(paths) * 1e3)
    report = {
        "cpu": cpu_model(), "isa": sorted(isa_flags() & {"avx2", "avx512f", "avx512_vnni", "amx_tile"}),
        "load_avg_1m": [load_start, os.getloadavg()[0]], "rounds": args.rounds, "old_rev": args.old_rev,
        **{kind: {"old_ms": statistics.median(ms[("old", kind)]), "new_ms": statistics.median(ms[("new", kind)]),
                  "new_over_old": statistics.median(ms[("new", kind)]) / statistics.median(ms[("old", kind)]),
                  "engines": {k: sorted(engines[(k, kind)]) for k in predictors}} for kind in files},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
