"""Write a model as a deployment graph: ONNX (fp32, or dynamically quantised to int8) or TorchScript.

These writers do not verify anything: `medvit.inference.export` checks a written graph against eager fp32
before it is kept for users, and the benchmark measures the drift itself.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medvit._io import atomic_path
from medvit._platform import int8_dot_product

_log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME, OUTPUT_NAME, FEATURES_NAME = "pixel_values", "logits", "features"


class _WithFeatures(nn.Module):
    """A model's `forward_with_features` as its forward, so a graph has both outputs of one pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_with_features(x)  # type: ignore[operator]


def graph_outputs(model: nn.Module) -> list[str]:
    """The outputs a graph of `model` has: the logits, and the pooled features where the model exposes them
    (`forward_with_features`), which the out-of-distribution check reads instead of a second, eager pass."""
    return [OUTPUT_NAME, FEATURES_NAME] if callable(getattr(model, "forward_with_features", None)) else [OUTPUT_NAME]


def _to_onnx(model: nn.Module, path: Path, input_size: Sequence[int], opset: int = OPSET) -> None:
    """fp32 ONNX with a dynamic batch axis. The TorchScript-based exporter (dynamo=False) is used because it
    handles timm ViTs on CPU in seconds; the dynamo exporter is far slower here for the same graph."""
    x = torch.zeros(1, *input_size)
    outputs = graph_outputs(model)
    module = _WithFeatures(model) if FEATURES_NAME in outputs else model
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about python control flow that is constant for ViTs
        torch.onnx.export(
            module.eval(), (x,), str(path), opset_version=opset, dynamo=False,
            input_names=[INPUT_NAME], output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *outputs)},
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


def set_onnx_metadata(path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write `metadata` into the ONNX file's metadata_props (read back by any runtime: ORT's `get_modelmeta()`)."""
    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **metadata})
    onnx.save(model, str(path))


def export_torchscript(model: nn.Module, path: str | os.PathLike, input_size: Sequence[int]) -> Path:
    """A traced TorchScript archive (for C++/mobile deployment, as the reference material uses)."""
    path = Path(path)
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.eval(), torch.zeros(1, *input_size))
        torch.jit.save(traced, str(tmp))
    return path
