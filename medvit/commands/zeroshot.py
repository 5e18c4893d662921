"""`medvit zeroshot --model SPEC --image FILE [--prompt TEXT ...] [--pair "POS|NEG" ...]`: a table of CLIP scores.

Without --prompt/--pair every finding is scored in pair mode. --prompt adds raw cosine similarities (and, with
--multiclass, a softmax across the prompts); --pair adds custom positive/negative pairs ("POS" alone is negated).
"""

from __future__ import annotations

import argparse

from medvit.findings import ALL_FINDINGS


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by zeroshot, zeroshot-eval and align."""
    parser.add_argument("--model", default=None,
                        help="CLIP spec, e.g. open_clip:ViT-B-32/laion2b_s34b_b79k, hf-hub:org/repo, "
                             "open_clip:local-dir:DIR, transformers:openai/clip-vit-base-patch32, transformers:DIR "
                             "(default: $MEDVIT_CLIP, then `model:` in the prompts config)")
    parser.add_argument("--prompts", default=None, help="prompts YAML (default: $MEDVIT_PROMPTS, else packaged)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="weight dtype; bf16 weights ran 1.6x faster on CPU here (autocast is never used)")
    parser.add_argument("--normalization", choices=["model", "chexzero"], default="model",
                        help="the CLIP's own preprocessing, or CheXzero's letterbox + MIMIC mean/std")
    parser.add_argument("--random-init", action="store_true",
                        help="accept an open_clip architecture without weights (from-scratch experiments only)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--image", required=True, help="DICOM, PNG or JPEG file")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="free-text prompt (repeatable)")
    parser.add_argument("--pair", action="append", default=[], metavar="POS|NEG",
                        help="positive/negative pair, e.g. 'pleural effusion|no pleural effusion' (repeatable)")
    parser.add_argument("--findings", nargs="+", default=None,
                        help="findings to score in pair mode (default: all, when no --prompt/--pair)")
    parser.add_argument("--templates", action="store_true", help="render --pair prompts through the templates too")
    parser.add_argument("--multiclass", action="store_true", help="also softmax across the --prompt texts")
    parser.add_argument("--temperatures", default=None, help="temperatures.json from `zeroshot-eval --fit-split`")
    parser.add_argument("--json", action="store_true", help="print JSON records instead of a table")


def run(args: argparse.Namespace) -> int:
    from medvit.data.dicom import read_image
    from medvit.zeroshot.scorer import ZeroShotScorer

    image = read_image(args.image)
    scorer = ZeroShotScorer.load(args.model, prompts=args.prompts, offline=args.offline, dtype=args.dtype,
                                 normalization=args.normalization, temperatures=args.temperatures,
                                 allow_random_init=args.random_init)
    findings = args.findings if args.findings is not None else ([] if args.prompt or args.pair else ALL_FINDINGS)
    pairs = scorer.requested_pairs(findings, args.pair, templated=args.templates)
    out = scorer.score_table(image, args.prompt, pairs, multiclass=args.multiclass)
    if args.json:
        print(out.to_json(orient="records", indent=2))
    else:
        print(f"model: {scorer.backend.model_id}   image: {args.image}   normalization: {args.normalization}")
        print(out.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        if (out.loc[out["mode"] == "pair", "calibration"] == "uncalibrated").any():
            print("pair probabilities are uncalibrated (T = 1/logit_scale); fit temperatures with "
                  "`medvit zeroshot-eval --fit-split train` and pass --temperatures")
    return 0
