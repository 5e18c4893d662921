"""`medvit align --model SPEC --pairs CSV --images DIR [--out DIR]`: contrastive site alignment of a CLIP.

--pairs is either image-text pairs (`image`, `text` columns: report sentences) or an NIH labels CSV whose labels
become captions through the prompt templates. The result folder loads like any other model
(`--model DIR` or `open_clip:local-dir:DIR` / `transformers:DIR`).
"""

from __future__ import annotations

import argparse

from medvit.commands.zeroshot import add_model_arguments


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
    parser.add_argument("--accum-steps", type=int, default=1, help="contrastive batches per optimizer update")
    parser.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this value")
    parser.add_argument("--trainable-image-blocks", type=int, default=2,
                        help="image blocks left trainable from the top (-1: the whole image tower)")
    parser.add_argument("--seed", type=int, default=0, help="seeds shuffling and any random initialisation")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted alignment in --out exactly")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from medvit.zeroshot.clip import load_clip
    from medvit.zeroshot.finetune import AlignConfig, align_and_save, load_alignment_pairs
    from medvit.zeroshot.prompts import load_prompt_config
    from medvit.zeroshot.spec import default_spec

    prompts = load_prompt_config(args.prompts)
    cfg = AlignConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      warmup_steps=args.warmup_steps, accum_steps=args.accum_steps, clip_grad=args.clip_grad,
                      normalization=args.normalization, seed=args.seed,
                      trainable_image_blocks=None if args.trainable_image_blocks < 0 else args.trainable_image_blocks)
    # read and check the CSV and its images before loading the model
    train, val = load_alignment_pairs(args.pairs, args.images, prompts, args.split or None, args.val_split or None)
    # training needs fp32 weights; --dtype only affects scoring. --seed also seeds a --random-init start, so
    # `zeroshot-eval --random-init --seed S` scores exactly the weights align started from.
    backend = load_clip(default_spec(args.model, prompts.model), offline=args.offline, dtype="fp32",
                        allow_random_init=args.random_init, seed=args.seed)
    meta = align_and_save(backend, train, val, Path(args.out), cfg, resume=args.resume,
                          meta={"random_init": bool(args.random_init), "pairs": str(args.pairs), "split": args.split,
                                "val_split": args.val_split})
    history = meta["history"]
    first, last = history[0], history[-1]
    print(f"aligned {backend.spec} on {len(train)} pairs: train loss {first['train_loss']:.4f} -> "
          f"{last['train_loss']:.4f}" + (f", val loss {first['val_loss']:.4f} -> {last['val_loss']:.4f}"
                                         if "val_loss" in last else ""))
    print(f"saved: {meta['saved_as']}")
    return 0
