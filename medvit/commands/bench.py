"""`medvit bench [--json] [--model-size base|tiny] [--run RUN_DIR]`: speed, efficiency, drift and latency here.

One process measures every backend on DeiT3-B/16-384 (random init) at batch 1 and 8, the fp32/bf16
matmul peaks, the mean-AUROC drift of the run (default: the demo model) on the dev val split, and the
DICOM -> table latency. `--json` prints exactly the issue's schema; `--save FILE` keeps every number.

`medvit bench --model NAME[,NAME...] [--json]` compares timm models instead (`edge`: the five reference edge
models): parameters, GFLOPs, size on disk and ms/image per engine, as a ratio to DeiT3-B eager fp32 measured in
the same run (`medvit.inference.edgebench`).
"""

from __future__ import annotations

import argparse

from medvit.inference import BACKENDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object (the documented schema)")
    parser.add_argument("--model-size", default="base", choices=["base", "tiny"],
                        help="base = DeiT3-B/16-384 (minutes); tiny = a 64-px 2-block DeiT3 (seconds, for tests)")
    parser.add_argument("--run", default=None, help="run for AUROC drift and latency (default: $MEDVIT_RUN, demo)")
    parser.add_argument("--model", metavar="NAME[,NAME...]", default=None,
                        help="compare these timm models (random init) against DeiT3-B eager fp32 instead; `edge` = "
                        "vit_tiny_patch16_224,deit_tiny_patch16_224,mobilevit_s,efficientvit_m0,fastvit_t8")
    parser.add_argument("--backends", nargs="+", default=None, choices=list(BACKENDS), metavar="NAME",
                        help=f"backends to measure (default: all of {', '.join(BACKENDS)}; with --model: torch onnx "
                        "onnx-int8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median and min)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs (compiled backends warm up when built)")
    parser.add_argument("--e2e-repeats", type=int, default=3, help="timed DICOM -> table passes per file")
    parser.add_argument("--data", default=None, help="cxr14-dev folder (labels.csv + images/) for real inputs")
    parser.add_argument("--save", default=None, help="also write every measurement to this JSON file")


def _print_report(details: dict) -> None:
    m = details["machine"]
    print(f"{details['model']} ({details['gflop_per_image']:.1f} GFLOP/image) on {m['cpu']}, {m['cpus']} CPUs, "
          f"torch {m['torch']}, load avg {m['load_avg_1m']:.2f} -> {m['load_avg_1m_end']:.2f}")
    print(f"matmul peak: fp32 {details['peak_gflops']['fp32']:.0f} GFLOP/s, bf16 {details['peak_gflops']['bf16']:.0f}")
    print(f"{'batch':>5} {'backend':<14} {'ms/img':>8} {'min':>8} {'img/s':>7} {'speedup':>7} {'GFLOP/s':>8} "
          f"{'%fp32pk':>7} {'%bf16pk':>7} {'max|dp|':>8} {'RSS MB':>7}")
    for bs, rows in details["batches"].items():
        for name, r in rows.items():
            print(f"{bs:>5} {name:<14} {r['ms_per_image']:8.1f} {r['min_ms_per_image']:8.1f} {r['images_per_s']:7.2f} "
                  f"{r['speedup']:7.2f} {r['gflops']:8.1f} {100 * r['frac_fp32_peak']:6.1f}% "
                  f"{100 * r['frac_bf16_peak']:6.1f}% {r['max_abs_dp']:8.2g} {r['rss_mb']:7.0f}")
    print(f"default (fastest within tolerance at batch 1): {details['default_backend']}; "
          f"peak RSS {details['peak_rss_mb']:.0f} MB")
    if details["mean_auroc"]:
        print(f"mean AUROC on {details['auroc_images']} val images ({details['auroc_run']}): " + ", ".join(
            f"{b} {v:.4f} ({details['auroc_drift'][b if b != 'torch' else 'torch-fp32']:+.4f})"
            for b, v in details["mean_auroc"].items()))
    for name, r in details["e2e"].items():
        print(f"{name} -> table ({details['e2e_backend']}): {r['total']:.0f} ms = decode {r['decode']:.0f} + "
              f"preprocess {r['preprocess']:.0f} + forward {r['forward']:.0f} + calibrate {r['calibrate']:.1f}")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from medvit.errors import ConfigError
    from medvit.inference.bench import DEV_DATA, BenchOptions, run_bench

    if args.repeats < 1 or args.e2e_repeats < 1 or args.warmup < 0:
        raise ConfigError("--repeats and --e2e-repeats must be >= 1, --warmup >= 0")
    if args.model is not None:
        return _run_models(args)
    opts = BenchOptions(model_size=args.model_size, run_dir=args.run, backends=args.backends or list(BACKENDS),
                        warmup=args.warmup, repeats=args.repeats, e2e_repeats=args.e2e_repeats,
                        data_dir=Path(args.data) if args.data else DEV_DATA)
    report = run_bench(opts)
    if args.save:
        Path(args.save).write_text(json.dumps(report.details(), indent=2, default=float) + "\n")
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        _print_report(report.details())
    return 0


def _run_models(args: argparse.Namespace) -> int:
    """`--model`: the edge comparison (`--model-size` picks the baseline: base = DeiT3-B/16-384)."""
    import json
    from pathlib import Path

    from medvit.inference.bench import DEV_DATA
    from medvit.inference.edgebench import (
        EDGE_ENGINES,
        EdgeOptions,
        check_engines,
        format_table,
        parse_models,
        run_edge_bench,
    )

    engines = args.backends or list(EDGE_ENGINES)
    check_engines(engines)
    opts = EdgeOptions(models=parse_models(args.model), engines=engines, baseline_size=args.model_size,
                       warmup=args.warmup, repeats=args.repeats, data_dir=Path(args.data) if args.data else DEV_DATA)
    report = run_edge_bench(opts)
    if args.save:
        Path(args.save).write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(json.dumps(report, default=float) if args.json else format_table(report))
    return 0
