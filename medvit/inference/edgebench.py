"""`medvit bench --model NAME[,NAME...]`: small (edge) models against DeiT3-B/16-384 eager fp32, in one run.

Per model: parameters and forward GFLOPs (the architecture at its own input size, random init, no download);
per model and engine: the size of the file that engine loads (fp32 safetensors for torch, the .onnx graph for
ONNX Runtime, dynamically quantised int8 for `onnx-int8`), ms per image at batch 1 and 8 on real dev images,
the ratio to DeiT3-B eager fp32 at the same batch size, and max |dp| against the model's own eager fp32.

Graphs are exported without the fp32 gate `auto` applies: a benchmark records drift instead of refusing, and
`within_tolerance` says whether `auto` would accept the engine. Reparameterisable models (FastViT, MobileOne)
are benchmarked in their fused inference form, as they would be deployed.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from timm.utils.model import reparameterize_model
from torch import nn

from medvit._io import save_tensors
from medvit.data.transforms import resolve_preprocessing
from medvit.errors import CheckpointError, ConfigError
from medvit.findings import DEFAULT_FINDINGS
from medvit.inference import GRAPH_ENGINES
from medvit.inference.bench import (
    BASELINE,
    DEV_DATA,
    LABELS,
    SIZES,
    Timing,
    dev_images,
    machine_info,
    model_gflop,
    real_inputs,
    speed_model,
)
from medvit.inference.engines import AUTO_TOLERANCE, Backend, available_backends, create_backend, max_prob_diff

_log = logging.getLogger(__name__)

EDGE_MODELS = ("vit_tiny_patch16_224", "deit_tiny_patch16_224", "mobilevit_s", "efficientvit_m0", "fastvit_t8")
EDGE_ENGINES = ("torch", "onnx", "onnx-int8")


@dataclass
class EdgeOptions:
    models: Sequence[str]
    engines: Sequence[str] = EDGE_ENGINES
    baseline_size: str = "base"  # SIZES key: DeiT3-B/16-384 ("tiny" in tests)
    batch_sizes: Sequence[int] = (1, 8)
    warmup: int = 1
    repeats: int = 3
    data_dir: Path = DEV_DATA


def check_engines(engines: Sequence[str]) -> None:
    """OpenVINO needs calibrated, verified exports of a run: not offered here.

    Raises:
        ConfigError: an engine `--model` does not measure.
    """
    unsupported = [e for e in engines if e in GRAPH_ENGINES and not e.startswith("onnx")]
    if unsupported:
        raise ConfigError(f"bench --model measures torch and ONNX Runtime engines, not {', '.join(unsupported)}")


def parse_models(spec: str) -> list[str]:
    """`NAME[,NAME...]` (`edge` = the five reference edge models) as timm names, checked before any work.

    Raises:
        ConfigError: a name timm does not know.
    """
    names: list[str] = []
    for name in (n.strip() for n in spec.split(",")):
        for n in EDGE_MODELS if name == "edge" else (name,):
            if n and n not in names:
                names.append(n)
    unknown = [n for n in names if not timm.is_model(n)]
    if unknown or not names:
        raise ConfigError(
            f"--model {spec}: unknown timm model(s) {', '.join(unknown) or '(none given)'}; e.g. "
            f"{','.join(EDGE_MODELS[:2])} or `edge` for {', '.join(EDGE_MODELS)}"
        )
    return names


def build_edge_model(name: str) -> nn.Module:
    """The architecture with random weights (seeded), 14 outputs, in its deploy form."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=len(DEFAULT_FINDINGS)).eval()
    return reparameterize_model(model)


def _file_mb(paths: Sequence[Path]) -> float:
    return sum(p.stat().st_size for p in paths if p.is_file()) / 2**20


def _engine_for(name: str, model: nn.Module, inputs: np.ndarray, work: Path) -> tuple[Backend, float]:
    """Engine `name` over `model` and the MB of the file it loads (ONNX graphs exported unverified: the caller
    measures their drift)."""
    if name.startswith("onnx"):
        backend = create_backend(name, model, input_size=inputs.shape[1:], work_dir=work)
        return backend, _file_mb([Path(backend.path)])  # type: ignore[attr-defined]
    weights = work / "model.safetensors"
    save_tensors(weights, model.state_dict())
    return create_backend(name, model, input_size=inputs.shape[1:], work_dir=work), _file_mb([weights])


def _time(backend: Backend, x: np.ndarray, opts: EdgeOptions) -> float:
    """Median ms per image of `backend` on the batch `x`."""
    return Timing.of(partial(backend, x), opts.warmup, opts.repeats).median_ms / len(x)


def _baseline(opts: EdgeOptions, paths: list[str]) -> tuple[dict[str, Any], Callable[[], dict[int, float]]]:
    """DeiT3-B/16-384 (or the tiny stand-in) eager fp32: its description, and a function timing it at each batch
    size (ms/image), called before and after the models so that load drift on a shared machine shows."""
    model = speed_model(opts.baseline_size)
    pre = resolve_preprocessing(model)
    x = real_inputs(paths, pre, max(opts.batch_sizes))
    backend = create_backend(BASELINE, model, input_size=pre["input_size"])
    out = {
        "model": SIZES[opts.baseline_size].timm_name,
        "engine": LABELS[BASELINE],
        "gflops": model_gflop(model, pre["input_size"]),
        "params_m": _params_m(model),
    }
    return out, lambda: {bs: _time(backend, x[:bs], opts) for bs in opts.batch_sizes}


def _params_m(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def bench_model(name: str, opts: EdgeOptions, paths: list[str]) -> dict[str, Any]:
    """One model: size and cost, then every engine timed at each batch size (ratios are added afterwards)."""
    model = build_edge_model(name)
    pre = resolve_preprocessing(model)
    x = real_inputs(paths, pre, max(opts.batch_sizes))
    row: dict[str, Any] = {
        "params_m": _params_m(model),
        "gflops": model_gflop(model, pre["input_size"]),
        "input_size": list(pre["input_size"]),
        "engines": {},
        "skipped": {},
    }
    reference = create_backend(BASELINE, model, input_size=pre["input_size"], warmup=False)(x)
    for engine in opts.engines:
        if engine not in available_backends():
            row["skipped"][engine] = "not available on this machine"
            continue
        with tempfile.TemporaryDirectory(prefix=f"medvit-edge-{engine}-") as tmp:
            try:
                backend, size_mb = _engine_for(engine, model, x, Path(tmp))
            except (CheckpointError, RuntimeError, ValueError) as e:  # export refused or failed for this model
                row["skipped"][engine] = str(e).splitlines()[0][:300]
                _log.warning("%s on %s skipped: %s", name, engine, row["skipped"][engine])
                continue
            dp = max_prob_diff(backend(x), reference)
            result: dict[str, Any] = {"size_mb": size_mb, "max_abs_dp": dp, "within_tolerance": dp <= AUTO_TOLERANCE}
            for bs in opts.batch_sizes:
                result[f"batch{bs}"] = {"ms_per_image": _time(backend, x[:bs], opts)}
                _log.info("%s %s batch %d: %.1f ms/image", name, engine, bs, result[f"batch{bs}"]["ms_per_image"])
            row["engines"][LABELS.get(engine, engine)] = result
            del backend
    return row


def run_edge_bench(opts: EdgeOptions) -> dict[str, Any]:
    """The baseline, every model, the baseline again, in one process.

    Each ratio divides by the geometric mean of the two baseline timings; both are kept (`..._start`, `..._end`),
    so a reader sees how much the load on a shared machine moved while the models ran.
    """
    if opts.baseline_size not in SIZES:
        raise ConfigError(f"--model-size must be one of {', '.join(SIZES)}")
    report: dict[str, Any] = {"machine": machine_info()}
    paths, _ = dev_images(opts.data_dir)
    baseline, timed = _baseline(opts, paths)
    start = timed()
    report["models"] = {name: bench_model(name, opts, paths) for name in opts.models}
    end = timed()
    for bs in opts.batch_sizes:
        baseline[f"batch{bs}_ms_per_image_start"], baseline[f"batch{bs}_ms_per_image_end"] = start[bs], end[bs]
        baseline[f"batch{bs}_ms_per_image"] = math.sqrt(start[bs] * end[bs])
    for row in report["models"].values():
        for result in row["engines"].values():
            for bs in opts.batch_sizes:
                timing = result[f"batch{bs}"]
                timing["ratio_to_baseline"] = baseline[f"batch{bs}_ms_per_image"] / timing["ms_per_image"]
    report["baseline"] = baseline
    report["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report as the text table `medvit bench --model` prints (and benchmarks/README.md keeps)."""
    b = report["baseline"]
    bs = sorted({int(k.removeprefix("batch").split("_")[0]) for k in b if k.startswith("batch")})
    lines = [
        f"baseline {b['model']} {b['engine']}: "
        + ", ".join(
            f"batch {n} {b[f'batch{n}_ms_per_image']:.1f} ms/image (before the models "
            f"{b[f'batch{n}_ms_per_image_start']:.1f}, after {b[f'batch{n}_ms_per_image_end']:.1f})"
            for n in bs
        )
        + f" ({b['gflops']:.2f} GFLOP)",
        f"{'model':<24} {'engine':<10} {'params M':>8} {'GFLOP':>6} {'MB':>6} "
        + " ".join(f"{f'b{n} ms':>8} {f'b{n} x':>6}" for n in bs)
        + f" {'max|dp|':>8}",
    ]
    for name, row in report["models"].items():
        for engine, r in row["engines"].items():
            lines.append(
                f"{name:<24} {engine:<10} {row['params_m']:8.2f} {row['gflops']:6.2f} {r['size_mb']:6.1f} "
                + " ".join(
                    f"{r[f'batch{n}']['ms_per_image']:8.2f} {r[f'batch{n}']['ratio_to_baseline']:6.1f}" for n in bs
                )
                + f" {r['max_abs_dp']:8.2g}"
            )
        for engine, why in row["skipped"].items():
            lines.append(f"{name:<24} {engine:<10} skipped: {why}")
    return "\n".join(lines)
