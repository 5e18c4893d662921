"""`medvit train -c CONFIG [--set key=value ...] [--out DIR] [--resume RUN_DIR]`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, help="YAML config (optional with --resume: the run's own)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    parser.add_argument("--out", type=Path, help="run folder (default: out_dir from the config)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue this run exactly where it stopped")
    parser.add_argument("--stop-after", type=int, metavar="N",
                        help="end this session after N epochs; the run stays resumable")


def run(args: argparse.Namespace) -> int:
    from medvit._io import read_json
    from medvit.runs import SUMMARY
    from medvit.train.supervised import fit, resolve_config

    cfg = resolve_config(args.config, args.overrides, args.resume)
    run_dir = fit(cfg, out_dir=args.out, resume=args.resume, stop_after=args.stop_after)
    if (run_dir / SUMMARY).is_file():  # not on the non-zero ranks of torchrun
        print(json.dumps({"run_dir": str(run_dir), **read_json(run_dir / SUMMARY)}, indent=2))
    return 0
