"""`medvit align --model SPEC --pairs CSV --images DIR [--out DIR]`: contrastive site alignment of a CLIP.

--pairs is either image-text pairs (`image`, `text` columns: report sentences) or an NIH labels CSV whose labels
become captions through the prompt templates. The result folder loads like any other model
(`--model DIR` or `open_clip:local-dir:DIR` / `transformers:DIR`).
"""

from __future__ import annotations

import argparse
import logging

from medvit.commands.zeroshot import add_model_arguments, prepare_offline

_log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--pairs", required=True, help="pairs CSV (image,text) or NIH labels CSV (label captions)")
    parser.add_argument("--images", required=True, help="folder the CSV's image paths are relative to")
    parser.add_argument("--out", default="runs/align", help="output folder (model + align.json + metrics.csv)")
    parser.add_argument("--split", default="train", help="train on this split if the CSV has one ('' for all rows)")
    parser.add_argument("--val-split", default="val", help="report the contrastive loss on this split ('' for none)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--trainable-image-blocks", type=int, default=2,
                        help="image blocks left trainable from the top (-1: the whole image tower)")
    parser.add_argument("--seed", type=int, default=0, help="seeds shuffling and any random initialisation")


def run(args: argparse.Namespace) -> int:
    prepare_offline(args)
    import json
    from dataclasses import asdict
    from pathlib import Path

    import pandas as pd

    from medvit.errors import DatasetError
    from medvit.runs import METRICS_CSV
    from medvit.zeroshot.clip import default_spec, load_clip
    from medvit.zeroshot.finetune import AlignConfig, align, preprocess_images, read_pairs, select_pairs
    from medvit.zeroshot.prompts import load_prompt_config

    prompts = load_prompt_config(args.prompts)
    cfg = AlignConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      warmup_steps=args.warmup_steps, normalization=args.normalization, seed=args.seed,
                      trainable_image_blocks=None if args.trainable_image_blocks < 0 else args.trainable_image_blocks)
    pairs = read_pairs(args.pairs, args.images, prompts)  # read and check the CSV and its images once
    train = select_pairs(pairs, args.split or None, args.pairs)
    val = None
    if args.val_split:
        try:
            val = select_pairs(pairs, args.val_split, args.pairs)
        except DatasetError as e:  # no split column, or fewer than 2 pairs in it: align without validation
            _log.warning("no validation pairs: %s", e)
    spec = default_spec(args.model, prompts.model)
    # training needs fp32 weights; --dtype only affects scoring. --seed also seeds a --random-init start, so
    # `zeroshot-eval --random-init --seed S` scores exactly the weights align started from.
    backend = load_clip(spec, offline=args.offline, dtype="fp32", allow_random_init=args.random_init, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = preprocess_images(backend, list(train["path"]), cfg.normalization)
    val_data = None if val is None else (preprocess_images(backend, list(val["path"]), cfg.normalization),
                                         list(val["text"]))
    history = align(backend, images, list(train["text"]), cfg, variants=list(train["variants"]), val=val_data,
                    log_csv=out / METRICS_CSV)
    saved = backend.save(out)
    meta = {"source_model": str(backend.spec), "random_init": bool(args.random_init), "saved_as": saved,
            "pairs": str(args.pairs), "split": args.split, "val_split": args.val_split, "n_train": len(train),
            "n_val": 0 if val is None else len(val), "config": asdict(cfg), "history": history,
            "captions": pd.Series(train["text"]).value_counts().head(20).to_dict()}
    (out / "align.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    first, last = history[0], history[-1]
    print(f"aligned {backend.spec} on {len(train)} pairs: train loss {first['train_loss']:.4f} -> "
          f"{last['train_loss']:.4f}" + (f", val loss {first['val_loss']:.4f} -> {last['val_loss']:.4f}"
                                         if "val_loss" in last else ""))
    print(f"saved: {saved}")
    return 0
