"""Export a run to ONNX (fp32 or dynamic int8) or TorchScript, verified against torch before it is kept.

An exported graph is only written into the run folder after it reproduces the torch model on real
images from the run's own data (or pydicom-data's RG1_UNCI chest CR when that data is absent). The
file's sha256 and the verification numbers go into `run_dir/exports.json` (and a `sha256sum`-style
side file), so the Predictor can tell a verified export of *these* weights from a stale one.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medvit._io import atomic_path, write_json
from medvit._io import sha256_file as file_sha256
from medvit._platform import cache_root, int8_dot_product
from medvit.errors import CheckpointError, MedvitError
from medvit.inference.engines import AUTO_TOLERANCE, Backend, OnnxBackend, TorchBackend, max_prob_diff
from medvit.runs import EXPORTS, RunInfo

_log = logging.getLogger(__name__)

OPSET = 17
# max |delta p| against torch: fp32 graphs must agree to rounding; int8 may move a probability by 2 points.
TOLERANCE = {"onnx": 1e-4, "torchscript": 1e-4, "onnx-int8": AUTO_TOLERANCE}
FILENAMES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx", "torchscript": "model.torchscript.pt"}
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"


def _to_onnx(model: nn.Module, path: Path, input_size: Sequence[int], opset: int = OPSET) -> None:
    """fp32 ONNX with a dynamic batch axis. The TorchScript-based exporter (dynamo=False) is used because it
    handles timm ViTs on CPU in seconds; the dynamo exporter is far slower here for the same graph."""
    x = torch.zeros(1, *input_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about python control flow that is constant for ViTs
        torch.onnx.export(
            model.eval(), (x,), str(path), opset_version=opset, dynamo=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )


@dataclass(frozen=True)
class Int8Scheme:
    """How ORT's dynamic quantiser is asked to quantise, chosen from the CPU's int8 instructions."""

    name: str
    reduce_range: bool
    why: str


def int8_scheme() -> Int8Scheme:
    """ORT's documented remedy for CPUs without VNNI: 7-bit weights (`reduce_range`) so u8 x s8 pair sums fit int16.

    u8u8 weights would also avoid the saturation, but measured 0.83x eager fp32 on AVX2 (DeiT3-B, batch 1)
    against 1.64x for reduced-range u8s8 (benchmarks/README.md).
    """
    if int8_dot_product():
        return Int8Scheme("s8-per-channel", False, "VNNI/AMX int8 dot product: full-range int8 weights")
    return Int8Scheme("s8-per-channel-reduced", True,
                      "no VNNI/AMX: 7-bit weights, since AVX2's u8s8 kernel saturates with full-range int8")


def quantize_int8(src: Path, dst: Path, scheme: Int8Scheme) -> None:
    """ORT dynamic quantisation of the MatMuls: int8 per-channel weights, activations quantised per batch at run time.

    The patch-embedding Conv stays fp32: ConvInteger is slower than fp32 Conv in ORT and adds error.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quant_log = logging.getLogger("onnxruntime.quantization")  # its per-tensor chatter, not the process's logging
    level, root_level = quant_log.level, logging.root.level
    quant_log.setLevel(logging.ERROR)
    logging.root.setLevel(max(root_level, logging.ERROR))  # the quantiser also logs through the root logger
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=scheme.reduce_range, op_types_to_quantize=["MatMul"])
    finally:
        quant_log.setLevel(level)
        logging.root.setLevel(root_level)


def export_onnx(model: nn.Module, path: str | os.PathLike, input_size: Sequence[int], *, int8: bool = False,
                opset: int = OPSET) -> Path:
    """Write `model` as ONNX (optionally dynamically quantised to int8) to `path`, unverified.

    Callers that keep the file for users go through `export_run` / `verified_onnx`, which verify it.
    """
    path = Path(path)
    t0 = time.perf_counter()
    with atomic_path(path) as tmp:
        if int8:
            with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fp32.") as fp32_dir:
                fp32 = Path(fp32_dir) / "model.onnx"
                _to_onnx(model, fp32, input_size, opset)
                quantize_int8(fp32, tmp, int8_scheme())
        else:
            _to_onnx(model, tmp, input_size, opset)
    _log.info("exported %s (%.0f MB) in %.1f s", path.name, path.stat().st_size / 2**20, time.perf_counter() - t0)
    return path


def export_torchscript(model: nn.Module, path: str | os.PathLike, input_size: Sequence[int]) -> Path:
    """A traced TorchScript archive (for C++/mobile deployment, as the reference material uses)."""
    path = Path(path)
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.eval(), torch.zeros(1, *input_size))
        torch.jit.save(traced, str(tmp))
    return path


@dataclass(frozen=True)
class Verification:
    """How an exported graph compares with torch on real inputs."""

    max_abs_diff: float  # logits
    max_abs_dp: float  # sigmoid probabilities
    n_images: int
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_dp <= self.tolerance and np.isfinite(self.max_abs_diff)


def verify(candidate: Backend, model: nn.Module, inputs: np.ndarray, tolerance: float) -> Verification:
    """Compare `candidate` with eager fp32 torch on `inputs` (N, C, H, W), at batch N and batch 1."""
    ref = TorchBackend(model)(inputs)
    out = np.concatenate([candidate(inputs), candidate(inputs[:1])])
    ref2 = np.concatenate([ref, ref[:1]])
    diff = float(np.max(np.abs(out - ref2))) if out.shape == ref2.shape else float("inf")
    dp = max_prob_diff(out, ref2) if out.shape == ref2.shape else float("inf")
    return Verification(diff, dp, len(inputs), tolerance)


def _run_images(config: dict[str, Any], n: int) -> list[str]:
    """Up to `n` image paths from the run's own data (val split first), or [] when it is not on this machine."""
    from medvit.data.datasets import load_labels
    from medvit.findings import DEFAULT_FINDINGS

    try:
        data = config["data"]
        findings = data.get("findings") or DEFAULT_FINDINGS
        df = load_labels(data["labels_csv"], data["images_root"], findings, check_files=False)
    except (OSError, KeyError, TypeError, ValueError, MedvitError) as e:
        _log.info("run data not available for verification (%s)", e)
        return []
    if df["split"].notna().any():
        df = df.assign(_order=df["split"] != "val").sort_values("_order", kind="stable")
    return list(itertools.islice((p for p in df["path"] if os.path.isfile(p)), n))


def reference_images(config: dict[str, Any] | None, n: int = 4) -> list[str]:
    """Real images to verify against: the run's data (`config.json` "config"), else pydicom-data's RG1_UNCI."""
    paths = _run_images(config, n) if config else []
    if paths:
        return paths
    try:
        from pydicom.data import get_testdata_file

        fallback = get_testdata_file("RG1_UNCI.dcm")
    except ImportError:
        fallback = None
    if fallback is None:
        raise CheckpointError(
            "no real image to verify against: the run's data is absent and pydicom-data is not installed "
            "(pip install pydicom-data)"
        )
    return [str(fallback)]


def reference_inputs(config: dict[str, Any] | None, preprocessing: dict[str, Any], n: int = 4) -> np.ndarray:
    """`reference_images` decoded and preprocessed exactly as the Predictor does: (N, C, H, W) float32."""
    from medvit.data.dicom import read_image
    from medvit.data.transforms import build_transforms

    transform = build_transforms(preprocessing, train=False)
    return np.stack([transform(read_image(p).pixels).numpy() for p in reference_images(config, n)])


@dataclass(frozen=True)
class ExportResult:
    path: Path
    sha256: str
    format: str
    verification: Verification


def _load_exports(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / EXPORTS).read_text())
    except (OSError, ValueError):
        return {}


def _record(folder: Path, result: ExportResult, weights_sha256: str) -> None:
    exports = _load_exports(folder)
    exports[result.path.name] = {
        "format": result.format, "sha256": result.sha256, "weights_sha256": weights_sha256, "opset": OPSET,
        **({"int8_scheme": int8_scheme().name} if result.format == "onnx-int8" else {}),
        **asdict(result.verification), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(folder / EXPORTS, exports)
    (folder / f"{result.path.name}.sha256").write_text(f"{result.sha256}  {result.path.name}\n")


def export_model(model: nn.Module, out_dir: Path, fmt: str, inputs: np.ndarray, *, weights_sha256: str,
                 tolerance: float | None = None) -> ExportResult:
    """Export, verify on `inputs`, and keep the file only when it matches torch.

    Args:
        fmt: "onnx", "onnx-int8" or "torchscript".
        inputs: real preprocessed images (N, C, H, W).
        weights_sha256: sha256 of the weights file, recorded so stale exports are detected.
        tolerance: max |delta p| allowed (default TOLERANCE[fmt]).

    Raises:
        CheckpointError: the exported graph disagrees with torch (nothing is written).
    """
    if fmt not in FILENAMES:
        raise MedvitError(f"unknown export format {fmt!r}; choose onnx (optionally --int8) or torchscript")
    tolerance = TOLERANCE[fmt] if tolerance is None else tolerance
    final = out_dir / FILENAMES[fmt]
    input_size = inputs.shape[1:]
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export.") as tmp:
        staged = Path(tmp) / final.name
        if fmt == "torchscript":
            export_torchscript(model, staged, input_size)
            candidate: Backend = TorchBackend(torch.jit.load(str(staged), map_location="cpu"))
        else:
            export_onnx(model, staged, input_size, int8=fmt == "onnx-int8")
            candidate = OnnxBackend(staged, name=fmt)
        check = verify(candidate, model, inputs, tolerance)
        del candidate
        _log.info("%s vs torch on %d real image(s): max |d logit| %.3g, max |dp| %.3g (tolerance %.3g)",
                  fmt, check.n_images, check.max_abs_diff, check.max_abs_dp, tolerance)
        if not check.ok:
            how = f" ({int8_scheme().name}: {int8_scheme().why})" if fmt == "onnx-int8" else ""
            raise CheckpointError(
                f"refusing to write {final.name}{how}: it disagrees with the torch model on real images "
                f"(max |dp| {check.max_abs_dp:.3g} > tolerance {tolerance:.3g}, max |d logit| {check.max_abs_diff:.3g})"
            )
        os.replace(staged, final)
    result = ExportResult(final, file_sha256(final), fmt, check)
    _record(out_dir, result, weights_sha256)
    return result


def export_run(run_dir: str | os.PathLike | None, fmt: str, *, int8: bool = False,
               tolerance: float | None = None) -> ExportResult:
    """`medvit export`: export the run's model into its folder, verified on the run's real images."""
    from medvit.inference.predictor import load_model

    model, info = load_model(run_dir)
    kind = "onnx-int8" if (fmt == "onnx" and int8) else fmt
    if int8 and fmt != "onnx":
        raise MedvitError("--int8 applies to --format onnx only")
    inputs = reference_inputs(info.config, info.preprocessing)
    return export_model(model, info.run_dir, kind, inputs, weights_sha256=info.weights_sha256, tolerance=tolerance)


def verified_onnx(model: nn.Module, info: RunInfo, int8: bool, inputs: np.ndarray | None = None) -> Path:
    """A verified ONNX file of exactly these weights: the run's own export if current, else one exported (and
    verified on `inputs`, default `reference_inputs`) into the user cache, which also serves read-only run
    folders such as the packaged demo."""
    kind = "onnx-int8" if int8 else "onnx"
    name = FILENAMES[kind]
    weights_sha256 = info.weights_sha256
    for folder in (info.run_dir, cache_root() / "onnx" / weights_sha256[:16]):
        rec = _load_exports(folder).get(name) or {}
        path = folder / name
        scheme_ok = not int8 or rec.get("int8_scheme") == int8_scheme().name  # int8 made for another ISA: redo
        if (rec.get("weights_sha256") == weights_sha256 and scheme_ok and path.is_file()
                and file_sha256(path) == rec["sha256"]):
            return path
    folder = cache_root() / "onnx" / weights_sha256[:16]
    folder.mkdir(parents=True, exist_ok=True)
    if inputs is None:
        inputs = reference_inputs(info.config, info.preprocessing)
    return export_model(model, folder, kind, inputs, weights_sha256=weights_sha256).path
