"""`medvit bench`: inference speed, matmul-peak efficiency, drift and end-to-end latency, measured in one run.

Everything is a ratio against eager fp32 measured in the same process, so numbers from a busy shared
machine still compare backends fairly. The speed model is the real DeiT3-B/16-384 architecture with
random weights; DeiT3's LayerScale starts at 1e-6, which makes a random model's output constant, so
the gains are set to 0.1 (speed is unchanged) so that drift against fp32 is measured on outputs that
actually depend on the image. AUROC drift uses a real trained run (the demo model by default).
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from pydicom.data import get_testdata_file
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from medvit._platform import bf16_supported, cpu_model, isa_flags
from medvit.data.datasets import label_matrix, load_labels
from medvit.data.dicom import read_image
from medvit.data.transforms import build_transforms, resolve_preprocessing
from medvit.errors import CheckpointError, ConfigError, MedvitError
from medvit.evaluate.metrics import mean_auroc
from medvit.findings import DEFAULT_FINDINGS
from medvit.inference import BACKENDS, GRAPH_ENGINES, export
from medvit.inference.choice import auto_candidates
from medvit.inference.engines import (
    AUTO_TOLERANCE,
    Backend,
    available_backends,
    create_backend,
    max_prob_diff,
)
from medvit.inference.fp32check import reference_images
from medvit.inference.graphs import int8_scheme
from medvit.inference.predictor import Predictor, load_model

_log = logging.getLogger(__name__)

BASELINE = "torch"
LABELS = {"torch": "torch-fp32"}  # the JSON names the eager fp32 baseline explicitly
E2E_FILES = ("RG1_UNCI.dcm", "RG1_J2KR.dcm")
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
DEV_DATA = Path(os.environ.get("MEDVIT_DEV_DATA", Path(__file__).resolve().parents[3] / "shared/data/cxr14-dev"))


@dataclass(frozen=True)
class SpeedModel:
    timm_name: str
    kwargs: dict[str, Any]
    matmul_n: int  # matrix side for the peak measurement


SIZES = {
    "base": SpeedModel("deit3_base_patch16_384", {}, 4096),
    "tiny": SpeedModel("deit3_small_patch16_384", {"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 64}, 512),
}


@dataclass
class BenchOptions:
    model_size: str = "base"
    run_dir: str | None = None
    backends: Sequence[str] = BACKENDS
    batch_sizes: Sequence[int] = (1, 8)
    warmup: int = 1
    repeats: int = 3
    data_dir: Path = DEV_DATA
    e2e_repeats: int = 3


@dataclass
class Timing:
    median_ms: float
    min_ms: float

    @classmethod
    def of(cls, fn: Callable[[], Any], warmup: int, repeats: int) -> Timing:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return cls(statistics.median(times), min(times))


def rss_mb() -> float:
    """Current resident set size of this process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak_gflops(dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """Best achieved GFLOP/s of an n x n matmul: the machine's practical peak for this dtype.

    Several warm-up runs first: a single one measured a peak below what the model forward then achieved
    (the CPU had not reached its sustained clock yet).
    """
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    t = Timing.of(lambda: torch.matmul(a, b), warmup=3, repeats=repeats)
    return 2 * n**3 / (t.min_ms * 1e-3) / 1e9


def model_gflop(model: nn.Module, input_size: Sequence[int]) -> float:
    """Forward FLOPs of one image (2 per multiply-add; torch's counter covers matmuls and convolutions).

    Attention is counted through the math SDPA path: the counter has no formula for the fused CPU
    flash-attention kernel and would silently leave attention's ~11% of a DeiT3-B out.
    """
    counter = FlopCounterMode(display=False)
    device = next(model.parameters()).device  # works on the meta device too (no compute)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(torch.zeros(1, *input_size, device=device))
    return counter.get_total_flops() / 1e9


def speed_model(size: str) -> nn.Module:
    """The benchmark architecture with random weights and non-degenerate LayerScale (see module doc)."""
    spec = SIZES[size]
    torch.manual_seed(0)
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=14, **spec.kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(0.1)
    return model


def dev_images(data_dir: Path, split: str = "val") -> tuple[list[str], np.ndarray | None]:
    """Image paths and (N, K) labels of the dev set split; ([], None) when it is not on this machine."""
    try:
        df = load_labels(data_dir / "labels.csv", data_dir / "images")
    except MedvitError as e:
        _log.warning("dev data unavailable (%s)", e)
        return [], None
    df = df[df["split"] == split]
    return list(df["path"]), label_matrix(df, DEFAULT_FINDINGS)


def real_inputs(paths: Sequence[str], preprocessing: dict[str, Any], n: int) -> np.ndarray:
    """n real preprocessed images (cycling through `paths`; RG1_UNCI.dcm when there are none)."""
    paths = list(paths) or reference_images(None)
    transform = build_transforms(preprocessing, train=False)
    decoded = [transform(read_image(p).pixels).numpy() for p in paths[:n]]
    return np.stack([decoded[i % len(decoded)] for i in range(n)])


@dataclass
class Report:
    """All measurements; `to_json` gives the issue's schema, `details` everything else."""

    batches: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    peak_gflops: dict[str, float] = field(default_factory=dict)
    e2e: dict[str, dict[str, float]] = field(default_factory=dict)
    auroc: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        def label(b: str) -> str:
            return LABELS.get(b, b)

        out: dict[str, Any] = {"baseline": label(BASELINE)}
        for bs, rows in self.batches.items():
            out[f"batch{bs}"] = {
                label(b): {k: r[k] for k in ("ms_per_image", "speedup", "max_abs_dp")} for b, r in rows.items()
            }
        out["peak_gflops"] = dict(self.peak_gflops)
        out["e2e_ms"] = {name: r["total"] for name, r in self.e2e.items()}
        base = self.auroc.get(BASELINE)
        out["auroc_drift"] = {label(b): (v - base if base is not None else float("nan")) for b, v in self.auroc.items()}
        out["default_engine"] = label(self.info.get("default_backend", BASELINE))
        out["machine"] = {k: self.info["machine"][k] for k in ("cpu", "isa", "int8_scheme")}
        return out

    def details(self) -> dict[str, Any]:
        return {**self.to_json(), "batches": {str(k): v for k, v in self.batches.items()}, "e2e": self.e2e,
                "mean_auroc": self.auroc, **self.info}


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (see `medvit._platform`)."""
    flags = isa_flags()
    return {"cpu": cpu_model(), "isa": {f: f in flags for f in ISA_FLAGS}, "int8_scheme": int8_scheme().name,
            "arch": platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "bf16_native": bf16_supported(),
            "amx": "amx_bf16" in isa_flags(), "load_avg_1m": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _engine(name: str, model: nn.Module, inputs: np.ndarray, work_dir: Path) -> Backend:
    """Engine `name` over `model`; graph engines go through the verified export, so a refused one raises.

    Raises:
        CheckpointError: the exported graph drifts from eager fp32 beyond its tolerance.
    """
    if name not in GRAPH_ENGINES:
        return create_backend(name, model, input_size=inputs.shape[1:], work_dir=work_dir)
    result = export.export_model(model, work_dir, name, inputs, weights_sha256="bench")
    return create_backend(name, model, input_size=inputs.shape[1:],
                          graph_provider=lambda kind: export.open_graph(kind, result.path))


def bench_speed(opts: BenchOptions, report: Report, work_dir: Path) -> None:
    """Batch 1 and 8 timings, GFLOP/s vs the matmul peaks, RSS and drift for every backend on the speed model."""
    model = speed_model(opts.model_size)
    pre = resolve_preprocessing(model)
    input_size = pre["input_size"]
    n = SIZES[opts.model_size].matmul_n
    # Without native bf16 the bf16 matmul is emulated at ~1-2 GFLOP/s: a 4096^2 product would take minutes
    # per repeat (22 min in all on an AVX2-only EPYC), so the emulated peak is measured on a 512^2 product.
    bf16_n = n if bf16_supported() else min(n, 512)
    report.peak_gflops = {"fp32": matmul_peak_gflops(torch.float32, n),
                          "bf16": matmul_peak_gflops(torch.bfloat16, bf16_n)}
    gflop = model_gflop(model, input_size)
    paths, _ = dev_images(opts.data_dir)
    x_all = real_inputs(paths, pre, max(*opts.batch_sizes, export.CALIBRATION_IMAGES))
    report.info.update(model=SIZES[opts.model_size].timm_name, gflop_per_image=gflop, input_size=input_size)
    names = [BASELINE, *(b for b in opts.backends if b != BASELINE)]
    fp32 = create_backend(BASELINE, model, input_size=input_size)
    reference = {bs: fp32(x_all[:bs]) for bs in opts.batch_sizes}
    for name in names:
        if name not in available_backends():
            report.info.setdefault("skipped", {})[name] = "not available on this machine"
            continue
        t0 = time.perf_counter()
        try:  # compiles / exports + verifies here
            backend = _engine(name, model, x_all[: export.CALIBRATION_IMAGES], work_dir)
        except CheckpointError as e:  # refused by the fp32 check, as `auto` would: not worth timing
            report.info.setdefault("skipped", {})[name] = str(e)
            _log.warning("%s skipped: %s", name, e)
            continue
        setup_s = time.perf_counter() - t0
        for bs in opts.batch_sizes:
            x = x_all[:bs]
            t = Timing.of(partial(backend, x), opts.warmup, opts.repeats)
            per_image = t.median_ms / bs
            row = {"ms_per_image": per_image, "min_ms_per_image": t.min_ms / bs, "images_per_s": 1e3 / per_image,
                   "max_abs_dp": max_prob_diff(backend(x), reference[bs]), "gflops": gflop / (per_image * 1e-3),
                   "rss_mb": rss_mb(), "setup_s": setup_s}
            row["frac_fp32_peak"] = row["gflops"] / report.peak_gflops["fp32"]
            row["frac_bf16_peak"] = row["gflops"] / report.peak_gflops["bf16"]
            report.batches.setdefault(bs, {})[name] = row
            _log.info("%s batch %d: %.1f ms/image (min %.1f), max |dp| %.2g", name, bs, per_image,
                      t.min_ms / bs, row["max_abs_dp"])
        del backend
    for rows in report.batches.values():
        base = rows[BASELINE]["ms_per_image"]
        for row in rows.values():
            row["speedup"] = base / row["ms_per_image"]
    candidates = auto_candidates()  # the default is what `auto` would pick: its engines, within its tolerance
    ok = {b: r for b, r in report.batches[min(opts.batch_sizes)].items()
          if r["max_abs_dp"] <= AUTO_TOLERANCE and b in candidates}
    report.info["default_backend"] = min(ok, key=lambda b: ok[b]["ms_per_image"])
    report.info["peak_rss_mb"] = peak_rss_mb()


def bench_auroc(opts: BenchOptions, report: Report, work_dir: Path) -> None:
    """Mean val AUROC of the run under every backend (drift = backend - eager fp32)."""
    paths, labels = dev_images(opts.data_dir)
    if not paths or labels is None:
        report.info["auroc_note"] = f"no dev data at {opts.data_dir}"
        return
    model, info = load_model(opts.run_dir)
    x = real_inputs(paths, info.preprocessing, len(paths))
    report.info.update(auroc_run=str(info.run_dir), auroc_images=len(paths))
    outputs = {}
    timed = report.batches.get(min(opts.batch_sizes), {})  # engines the speed section did not refuse
    for name in [BASELINE, *(b for b in opts.backends if b != BASELINE and b in timed)]:
        try:
            backend = create_backend(name, model, input_size=info.preprocessing["input_size"],
                                     work_dir=work_dir / "auroc", warmup=False,
                                     graph_provider=lambda kind: export.verified_engine(model, info, kind))
        except CheckpointError as e:
            report.info.setdefault("auroc_skipped", {})[name] = str(e)
            continue
        outputs[name] = np.concatenate([backend(x[i : i + 8]) for i in range(0, len(x), 8)])
        report.auroc[name] = mean_auroc(labels, outputs[name], info.findings)[0]  # ranks: logits = probs
    report.info["auroc_run_max_abs_dp"] = {b: max_prob_diff(o, outputs[BASELINE]) for b, o in outputs.items()}


def bench_e2e(opts: BenchOptions, report: Report) -> None:
    """DICOM file -> table with the default (auto) backend: decode, preprocess, forward, calibrate, and the
    out-of-distribution check when the run has its statistics and the file no body-part tag (median ms)."""
    predictor = Predictor.from_dir(opts.run_dir)
    report.info["e2e_backend"] = predictor.backend.name
    for name in E2E_FILES:
        path = get_testdata_file(name)
        if path is None:
            continue
        stages: dict[str, list[float]] = {}  # decode, then the prediction's own stages (ood: untagged images), total
        for _ in range(opts.e2e_repeats + 1):  # the first pass warms caches and is dropped
            t0 = time.perf_counter()
            image = read_image(path, min_side=predictor.input_side)  # J2K: only the wavelet levels needed
            decode = (time.perf_counter() - t0) * 1e3
            pred = predictor.predict(image)
            total = (time.perf_counter() - t0) * 1e3
            for k, v in {"decode": decode, **pred.timings_ms, "total": total}.items():
                stages.setdefault(k, []).append(v)
        report.e2e[name] = {k: statistics.median(v[1:]) for k, v in stages.items()}
        report.e2e[name]["decode_level"] = image.meta.decode_level


def run_bench(opts: BenchOptions) -> Report:
    """All sections in one process, so every ratio compares numbers taken under the same load."""
    if opts.model_size not in SIZES:
        raise ConfigError(f"--model-size must be one of {', '.join(SIZES)}")
    report = Report(info={"machine": machine_info()})
    with tempfile.TemporaryDirectory(prefix="medvit-bench-") as tmp:
        bench_speed(opts, report, Path(tmp))
        try:
            bench_auroc(opts, report, Path(tmp))
            bench_e2e(opts, report)
        except CheckpointError as e:  # no run and no demo model: speed numbers are still worth having
            report.info["run_note"] = str(e)
            _log.warning("AUROC drift and end-to-end latency skipped: %s", e)
    report.info["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    return report
