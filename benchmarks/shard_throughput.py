"""`torchrun` sharded `medvit predict`: 2 processes x 1 thread against 1 process x 1 thread, in one run.

Both runs predict the same folder of real dev images with the same run and engine, with no decoding workers
(`--workers 0`), so each process does its own decoding and forward pass on one core. Throughput is images over
the prediction phase as each process reports it (the slowest rank for torchrun), so interpreter and model
start-up, paid once per process, are left out; the wall times including them are printed too. The ratio is
the issue 14 target (>= 1.7x on a 2-core machine). The merged CSV is also compared with the single-process
one (after sorting), so a fast but wrong merge cannot pass.

    python benchmarks/shard_throughput.py [--run RUN_DIR] [--images 200] [--backend torch]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUMMARY = re.compile(r"(\d+) predicted, (\d+) error row\(s\), \d+ skipped(?: \(resume\))?; ([\d.]+) images/s")


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, seconds of the slowest process's prediction phase, from its own summary line)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    phases = [(int(n) + int(e)) / float(rate) for n, e, rate in SUMMARY.findall(proc.stderr) if float(rate) > 0]
    if not phases:
        raise SystemExit(f"no summary line in the output of {' '.join(cmd)}:\n{proc.stderr[-2000:]}")
    return wall, max(phases)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="run folder (default: the demo model)")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/cxr14-dev/images"))
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--backend", default="torch")
    args = parser.parse_args(argv)

    import pandas as pd

    from medvit._platform import cpu_model, isa_flags
    from medvit.resources import DEMO_RUN

    run = args.run or str(DEMO_RUN)
    with tempfile.TemporaryDirectory(prefix="medvit-shard-") as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        for p in sorted(Path(args.data).glob("*.png"))[: args.images]:
            (folder / p.name).symlink_to(p)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDVIT_CACHE": str(Path(tmp) / "cache")}
        common = [str(folder), "--run-dir", run, "--backend", args.backend, "--workers", "0", "--batch-size", "8"]
        one = Path(tmp) / "one.csv"
        two = Path(tmp) / "two.csv"
        # the same start-up cost on both sides: each process imports torch and loads the model once
        wall1, t1 = _timed([sys.executable, "-m", "medvit", "predict", *common, "--out", str(one)], env)
        wall2, t2 = _timed([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     "-m", "medvit", "predict", *common, "--out", str(two)], env)
        a = pd.read_csv(one).sort_values(["file", "finding"]).reset_index(drop=True)
        b = pd.read_csv(two).sort_values(["file", "finding"]).reset_index(drop=True)
        same = a.equals(b)
    n = len(a["file"].unique())
    print(json.dumps({"cpu": cpu_model(), "isa": sorted(isa_flags() & {"avx2", "avx512f", "avx512_vnni", "amx_int8"}),
                      "images": n, "backend": args.backend, "one_process_predict_s": round(t1, 2),
                      "two_processes_predict_s": round(t2, 2), "speedup": round(t1 / t2, 2),
                      "wall_s": {"one": round(wall1, 1), "two": round(wall2, 1)}, "identical_after_sort": same,
                      "load_avg_1m": os.getloadavg()[0]}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
