"""Export a run to ONNX (fp32 or dynamic int8) or TorchScript, verified against torch before it is kept.

An exported graph is only written into the run folder after it reproduces the torch model on real
images from the run's own data (or pydicom-data's RG1_UNCI chest CR when that data is absent). The
file's sha256 and the verification numbers go into `run_dir/exports.json` (and a `sha256sum`-style
side file), so the Predictor can tell a verified export of *these* weights from a stale one. The graphs are
written by `medvit.inference.graphs` and compared with torch by `medvit.inference.fp32check.verify`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medvit._io import atomic_write_bytes, write_json
from medvit._io import sha256_file as file_sha256
from medvit._platform import cache_root
from medvit.errors import CheckpointError, MedvitError
from medvit.inference.engines import AUTO_TOLERANCE, Backend, OnnxBackend, TorchBackend
from medvit.inference.fp32check import Verification, reference_inputs, verify
from medvit.inference.graphs import OPSET, export_onnx, export_torchscript, int8_scheme
from medvit.runs import EXPORTS, RunInfo, load_run, resolve_run_dir

_log = logging.getLogger(__name__)

# max |delta p| against torch: fp32 graphs must agree to rounding; int8 may move a probability by 2 points.
TOLERANCE = {"onnx": 1e-4, "torchscript": 1e-4, "onnx-int8": AUTO_TOLERANCE}
FILENAMES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx", "torchscript": "model.torchscript.pt"}


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
    atomic_write_bytes(folder / f"{result.path.name}.sha256", f"{result.sha256}  {result.path.name}\n".encode())


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
    model, info = load_run(resolve_run_dir(run_dir))
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
