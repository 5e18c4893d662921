"""`medvit export --run RUN_DIR --format onnx|openvino|torchscript [--int8]`: a verified graph in the run folder.

The graph is checked against torch on real images from the run's data (pydicom-data's RG1_UNCI when
that data is absent); a graph that disagrees is refused and nothing is written.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", default=None, help="run folder (default: $MEDVIT_RUN, else the demo model)")
    parser.add_argument("--format", default="onnx", choices=["onnx", "openvino", "torchscript"])
    parser.add_argument("--int8", action="store_true",
                        help="int8: ONNX Runtime dynamic quantisation (onnx) or NNCF post-training quantisation on "
                             "the run's own images (openvino); refused with the reason when it drifts from fp32")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="max |delta p| vs torch (default 1e-4 for fp32 graphs, 0.02 for int8)")


def run(args: argparse.Namespace) -> int:
    from medvit.inference.export import export_run

    result = export_run(args.run, args.format, int8=args.int8, tolerance=args.tolerance)
    v = result.verification
    print(f"{result.path}\nsha256 {result.sha256}\nverified on {v.n_images} real image(s): "
          f"max |d logit| {v.max_abs_diff:.3g}, max |dp| {v.max_abs_dp:.3g} (tolerance {v.tolerance:.3g})")
    return 0
