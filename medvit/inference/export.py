"""Export a run to ONNX (fp32 or dynamic int8), OpenVINO IR (fp32 or NNCF int8) or TorchScript, verified against
torch before it is kept.

An exported graph is only written into the run folder after it reproduces the torch model on real
images from the run's own data (or pydicom-data's RG1_UNCI chest CR when that data is absent). The
file's sha256 and the verification numbers go into `run_dir/exports.json` (and a `sha256sum`-style
side file), so the Predictor can tell a verified export of *these* weights from a stale one. The graphs are
written by `medvit.inference.graphs` and compared with torch by `medvit.inference.fp32check.verify`.
"""

from __future__ import annotations

import hashlib
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
from medvit.inference import openvino
from medvit.inference.engines import AUTO_TOLERANCE, Backend, OnnxBackend, TorchBackend, unavailable_reason
from medvit.inference.fp32check import Verification, reference_inputs, verify
from medvit.inference.graphs import (
    OPSET,
    OUTPUT_NAME,
    export_onnx,
    export_torchscript,
    graph_outputs,
    int8_scheme,
    set_onnx_metadata,
)
from medvit.inference.openvino import ir_files
from medvit.rundir import resolve_run_dir
from medvit.runs import EXPORTS, RunInfo, load_run

_log = logging.getLogger(__name__)

# max |delta p| against torch: fp32 graphs must agree to rounding; int8 may move a probability by 2 points.
TOLERANCE = {"onnx": 1e-4, "torchscript": 1e-4, "onnx-int8": AUTO_TOLERANCE, "openvino": 1e-4,
             "openvino-int8": AUTO_TOLERANCE}
FILENAMES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx", "torchscript": "model.torchscript.pt",
             "openvino": "model.openvino.xml", "openvino-int8": "model.openvino-int8.xml"}
VERIFY_IMAGES = 4  # real images every export is compared with eager fp32 on
CALIBRATION_IMAGES = 32  # NNCF's activation ranges come from this many of the run's own images


@dataclass(frozen=True)
class ExportResult:
    path: Path
    sha256: str
    format: str
    verification: Verification


def _files(path: Path) -> list[Path]:
    """The files of one export: an OpenVINO IR is graph (.xml) + weights (.bin)."""
    return list(ir_files(path)) if path.suffix == ".xml" else [path]


def _sha256(path: Path) -> str:
    """One checksum over all files of an export, so a stale .bin beside a current .xml is caught."""
    digests = [file_sha256(p) for p in _files(path)]
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()


def _stage(model: nn.Module, fmt: str, staged: Path, inputs: np.ndarray) -> Backend:
    """Write export `fmt` of `model` at `staged` and open it as an engine (not yet verified)."""
    input_size = inputs.shape[1:]
    if fmt == "torchscript":
        export_torchscript(model, staged, input_size)
        return TorchBackend(torch.jit.load(str(staged), map_location="cpu"))
    if fmt.startswith("onnx"):
        export_onnx(model, staged, input_size, int8=fmt == "onnx-int8")
        return OnnxBackend(staged, name=fmt)
    onnx_path = staged.with_suffix(".onnx")
    export_onnx(model, onnx_path, input_size)
    if fmt == "openvino":
        openvino.convert_onnx(onnx_path, staged)
    else:
        openvino.quantize_int8(onnx_path, staged, inputs)
    onnx_path.unlink()
    return openvino.OpenVinoBackend(staged, name=fmt)


def _load_exports(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / EXPORTS).read_text())
    except (OSError, ValueError):
        return {}


def _outputs(model: nn.Module, fmt: str) -> list[str]:
    """The outputs export `fmt` of `model` has (a TorchScript archive keeps the plain logits forward)."""
    return [OUTPUT_NAME] if fmt == "torchscript" else graph_outputs(model)


def _record(folder: Path, result: ExportResult, weights_sha256: str, outputs: list[str]) -> None:
    exports = _load_exports(folder)
    exports[result.path.name] = {
        "format": result.format, "sha256": result.sha256, "weights_sha256": weights_sha256, "opset": OPSET,
        "outputs": outputs,
        **({"int8_scheme": int8_scheme().name} if result.format.endswith("int8") else {}),
        **asdict(result.verification), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(folder / EXPORTS, exports)
    atomic_write_bytes(folder / f"{result.path.name}.sha256", f"{result.sha256}  {result.path.name}\n".encode())


def onnx_metadata(info: RunInfo) -> dict[str, str]:
    """What an exported ONNX file says about itself: findings (output order), preprocessing and the weights' hash,
    so a graph copied out of its run folder can still be served and checked."""
    return {"medvit.findings": json.dumps(list(info.findings)), "medvit.preprocessing": json.dumps(info.preprocessing),
            "medvit.weights_sha256": info.weights_sha256, "medvit.model": info.model_name,
            "medvit.output": "logits (sigmoid + the run's calibration.json give calibrated probabilities); features "
                             "(if present): the pooled features the out-of-distribution check reads"}


def export_model(model: nn.Module, out_dir: Path, fmt: str, inputs: np.ndarray, *, weights_sha256: str,
                 tolerance: float | None = None, metadata: dict[str, str] | None = None) -> ExportResult:
    """Export, verify on `inputs`, and keep the file only when it matches torch.

    Args:
        fmt: one of FILENAMES ("onnx", "onnx-int8", "openvino", "openvino-int8", "torchscript").
        inputs: real preprocessed images (N, C, H, W); the first 4 verify, all of them calibrate NNCF int8.
        weights_sha256: sha256 of the weights file, recorded so stale exports are detected.
        tolerance: max |delta p| allowed (default TOLERANCE[fmt]).
        metadata: written into an ONNX file's metadata_props (`onnx_metadata`).

    Raises:
        CheckpointError: the exported graph disagrees with torch (nothing is written).
    """
    if fmt not in FILENAMES:
        raise MedvitError(f"unknown export format {fmt!r}; choose onnx or openvino (optionally --int8) or torchscript")
    tolerance = TOLERANCE[fmt] if tolerance is None else tolerance
    final = out_dir / FILENAMES[fmt]
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export.") as tmp:
        staged = Path(tmp) / final.name
        candidate = _stage(model, fmt, staged, inputs)
        check = verify(candidate, model, inputs[:VERIFY_IMAGES], tolerance)
        del candidate
        _log.info("%s vs torch on %d real image(s): max |d logit| %.3g, max |dp| %.3g (tolerance %.3g)",
                  fmt, check.n_images, check.max_abs_diff, check.max_abs_dp, tolerance)
        if not check.ok:
            how = f" ({int8_scheme().name}: {int8_scheme().why})" if fmt.endswith("int8") else ""
            raise CheckpointError(
                f"refusing to write {final.name}{how}: it disagrees with the torch model on real images "
                f"(max |dp| {check.max_abs_dp:.3g} > tolerance {tolerance:.3g}, max |d logit| {check.max_abs_diff:.3g})"
            )
        if metadata and staged.suffix == ".onnx":
            set_onnx_metadata(staged, metadata)
        for src, dst in reversed(list(zip(_files(staged), _files(final), strict=True))):  # the .xml last
            os.replace(src, dst)
    result = ExportResult(final, _sha256(final), fmt, check)
    _record(out_dir, result, weights_sha256, _outputs(model, fmt))
    return result


def export_run(run_dir: str | os.PathLike | None, fmt: str, *, int8: bool = False,
               tolerance: float | None = None) -> ExportResult:
    """`medvit export`: export the run's model into its folder, verified on the run's real images."""
    if int8 and fmt not in ("onnx", "openvino"):
        raise MedvitError("--int8 applies to --format onnx or openvino only")
    kind = f"{fmt}-int8" if int8 else fmt
    if kind.startswith("openvino") and (reason := unavailable_reason(kind)):
        raise MedvitError(f"cannot export {kind}: {reason}")
    model, info = load_run(resolve_run_dir(run_dir))
    inputs = _inputs(info, kind)
    return export_model(model, info.run_dir, kind, inputs, weights_sha256=info.weights_sha256, tolerance=tolerance,
                        metadata=onnx_metadata(info))


def _inputs(info: RunInfo, kind: str) -> np.ndarray:
    """Real images for an export: a few to verify, more when NNCF calibrates on them."""
    n = CALIBRATION_IMAGES if kind == "openvino-int8" else VERIFY_IMAGES
    return reference_inputs(info.config, info.preprocessing, n=n)


def verified_graph(model: nn.Module, info: RunInfo, kind: str, inputs: np.ndarray | None = None) -> Path:
    """A verified graph file (`kind` in GRAPH_ENGINES) of exactly these weights: the run's own export if current,
    else one exported (verified on `inputs`, default the run's real images) into the user cache, which also
    serves read-only run folders such as the packaged demo. int8 files made for another CPU's int8 scheme
    are redone, and so are graphs without the outputs this model's graphs have now (features for the
    out-of-distribution check)."""
    name = FILENAMES[kind]
    weights_sha256 = info.weights_sha256
    cache = cache_root() / "graphs" / weights_sha256[:16]
    for folder in (info.run_dir, cache):
        rec = _load_exports(folder).get(name) or {}
        path = folder / name
        scheme_ok = not kind.endswith("int8") or rec.get("int8_scheme") == int8_scheme().name
        outputs_ok = rec.get("outputs", [OUTPUT_NAME]) == _outputs(model, kind)
        if (rec.get("weights_sha256") == weights_sha256 and scheme_ok and outputs_ok
                and all(p.is_file() for p in _files(path))
                and _sha256(path) == rec["sha256"]):
            return path
    cache.mkdir(parents=True, exist_ok=True)
    if inputs is None or (kind == "openvino-int8" and len(inputs) < CALIBRATION_IMAGES):
        inputs = _inputs(info, kind)
    return export_model(model, cache, kind, inputs, weights_sha256=weights_sha256, metadata=onnx_metadata(info)).path


def open_graph(kind: str, path: Path) -> Backend:
    """The engine that runs graph file `path`: ONNX Runtime for .onnx, OpenVINO for an IR's .xml."""
    return openvino.OpenVinoBackend(path, name=kind) if kind.startswith("openvino") else OnnxBackend(path, name=kind)


def verified_engine(model: nn.Module, info: RunInfo, kind: str, inputs: np.ndarray | None = None) -> Backend:
    """The engine `kind` over its verified graph file (see `verified_graph`)."""
    return open_graph(kind, verified_graph(model, info, kind, inputs))
