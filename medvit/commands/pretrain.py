"""`medvit pretrain -c CONFIG --out DIR [--set key=value ...]`: only the self-supervised stage.

`medvit train` runs the stage itself when the config has a `pretrain` section; this command is for
pretraining once (e.g. longer, on more images) and pointing several runs' `model.weights_file` at it.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, required=True, help="YAML config with a 'pretrain' section")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set pretrain.epochs=400 (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="folder for encoder.safetensors, metrics.csv")


def run(args: argparse.Namespace) -> int:
    from medvit.config import load_config
    from medvit.errors import ConfigError
    from medvit.train.mae import ENCODER, pretrain

    if (args.out / ENCODER).exists():
        raise ConfigError(f"{args.out} already holds a pretrained encoder; choose another --out")
    encoder = pretrain(load_config(args.config, args.overrides), args.out)
    print(f"encoder: {encoder}\nuse it with: --set model.pretrained=true --set model.weights_file={encoder}")
    return 0
