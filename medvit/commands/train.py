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
    from medvit.config import load_config, validate_config
    from medvit.errors import ConfigError
    from medvit.runs import CONFIG, SUMMARY
    from medvit.train.supervised import fit

    if args.config is None and args.resume is None:
        raise ConfigError("medvit train needs -c CONFIG (or --resume RUN_DIR to continue a run)")
    if args.config is not None:
        cfg = load_config(args.config, args.overrides)
    else:
        from medvit.config import apply_overrides

        saved = read_json(args.resume / CONFIG)["config"]
        cfg = validate_config(apply_overrides(saved, args.overrides), str(args.resume / CONFIG))
    run_dir = fit(cfg, out_dir=args.out, resume=args.resume, stop_after=args.stop_after)
    summary = run_dir / SUMMARY
    if summary.is_file():
        print(json.dumps({"run_dir": str(run_dir), **json.loads(summary.read_text())}, indent=2))
    return 0
