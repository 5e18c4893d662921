"""ONNX Runtime int8 with and without intra-op thread spinning, as ratios to eager torch fp32 (the baseline).

Exports DeiT3-B/16-384 (random init, 14 outputs) to int8 ONNX through `medvit.inference.graphs.export_onnx`, then times
eager fp32, ORT int8 with spinning (ORT's default, what medvit uses) and ORT int8 with
`session.intra_op.allow_spinning=0`, in interleaved rounds so all three see the same load. Prints the median
ratio eager / variant at batch 1 (median of 5 calls per round) and batch 8 (one call per round).

    python benchmarks/ort_spinning.py [--rounds 10] [--threads 2] [--out /tmp/medvit_ort_spinning]
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path
from typing import Any


def _without_spinning(shipped: Any) -> Any:
    """The shipped `OnnxBackend` with one change: intra-op pool threads sleep instead of spinning."""
    import onnxruntime as ort

    opts = shipped.session.get_session_options()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    variant = copy.copy(shipped)
    variant.session = ort.InferenceSession(str(shipped.path), opts, providers=shipped.session.get_providers())
    return variant


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/medvit_ort_spinning"))
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from medvit.config import ModelConfig
    from medvit.inference.engines import OnnxBackend, TorchBackend, median_ms
    from medvit.inference.graphs import export_onnx
    from medvit.model.classifier import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(name="deit3_base_patch16_384", pretrained=False, freeze_stem=False, freeze_blocks=0,
                      drop_path_rate=0.0)
    model = build_model(cfg, 14).eval()
    path = args.out / "deit3_base_int8.onnx"
    if not path.is_file():
        args.out.mkdir(parents=True, exist_ok=True)
        export_onnx(model, path, (3, 384, 384), int8=True)
    shipped = OnnxBackend(path, name="onnx-int8", threads=args.threads)
    variants = {"eager fp32": TorchBackend(model), "onnx-int8 (spinning)": shipped,
                "onnx-int8 (no spinning)": _without_spinning(shipped)}
    rng = np.random.default_rng(0)
    batches = {1: rng.random((1, 3, 384, 384), dtype=np.float32), 8: rng.random((8, 3, 384, 384), dtype=np.float32)}
    times: dict[tuple[str, int], list[float]] = {(v, b): [] for v in variants for b in batches}
    for backend in variants.values():  # warm-up
        for x in batches.values():
            backend(x)
    for _ in range(args.rounds):
        for v, backend in variants.items():
            for b, x in batches.items():
                times[v, b].append(median_ms(lambda: backend(x), repeats=5 if b == 1 else 1))  # noqa: B023
    for b in batches:
        base = statistics.median(times["eager fp32", b])
        ratios = ", ".join(f"{v} {base / statistics.median(times[v, b]):.2f}x" for v in variants if v != "eager fp32")
        print(f"batch {b}: eager fp32 {base / b:.0f} ms/image; {ratios}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
