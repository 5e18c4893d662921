"""`medvit export`: verified ONNX/TorchScript with checksums; a graph that disagrees with torch is refused."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from _inference_run import make_tiny_run

from medvit._io import sha256_file
from medvit.cli import main
from medvit.errors import CheckpointError
from medvit.inference import export, fp32check, graphs
from medvit.inference.engines import OnnxBackend, TorchBackend
from medvit.inference.predictor import load_model


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def run(tmp_path, dev_data):
    return make_tiny_run(tmp_path / "run", dev_data)


def test_onnx_export_is_verified_checksummed_with_dynamic_batch(run, capsys):
    assert main(["export", "--run", str(run), "--format", "onnx"]) == 0
    assert "max |d logit|" in capsys.readouterr().out
    path = run / "model.onnx"
    graph = onnx.load(str(path))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    record = json.loads((run / "exports.json").read_text())["model.onnx"]
    assert record["sha256"] == sha256_file(path)
    assert record["weights_sha256"] == sha256_file(run / "model.safetensors")
    assert record["n_images"] == 4 and record["max_abs_dp"] <= 1e-4
    assert (run / "model.onnx.sha256").read_text().split()[0] == record["sha256"]
    model, info = load_model(run)
    x = fp32check.reference_inputs(info.config, info.preprocessing, n=3)  # batch 3: the batch axis is dynamic
    np.testing.assert_allclose(OnnxBackend(path)(x), TorchBackend(model)(x), atol=1e-4)


def test_export_refuses_a_graph_that_disagrees(run, monkeypatch):
    real_to_onnx = graphs._to_onnx

    def perturbed(model, path, input_size, opset=graphs.OPSET):
        import copy

        bad = copy.deepcopy(model)
        with torch.no_grad():
            bad.head.bias.add_(0.5)  # a wrong graph: every logit shifted
        real_to_onnx(bad, path, input_size, opset)

    monkeypatch.setattr(graphs, "_to_onnx", perturbed)
    with pytest.raises(CheckpointError, match="refusing to write model.onnx"):
        export.export_run(run, "onnx")
    assert not (run / "model.onnx").exists()
    assert not (run / "exports.json").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".")], "no temp files left behind"
    assert main(["export", "--run", str(run), "--format", "onnx", "--int8"]) == 2


def test_int8_and_torchscript_exports(run):
    int8 = export.export_run(run, "onnx", int8=True)
    assert int8.path.name == "model.int8.onnx" and int8.verification.max_abs_dp <= export.TOLERANCE["onnx-int8"]
    assert int8.path.stat().st_size < (run / "model.safetensors").stat().st_size
    ts = export.export_run(run, "torchscript")
    assert ts.verification.max_abs_dp <= 1e-4
    assert set(json.loads((run / "exports.json").read_text())) == {"model.int8.onnx", "model.torchscript.pt"}


def test_verified_onnx_reuses_current_exports_and_replaces_stale_ones(run, tmp_path):
    model, info = load_model(run)
    exported = export.export_run(run, "onnx").path
    assert export.verified_onnx(model, info, int8=False) == exported
    (run / "model.onnx").write_bytes(b"tampered")  # checksum no longer matches: export again into the cache
    fresh = export.verified_onnx(model, info, int8=False)
    assert fresh != exported and fresh.is_relative_to(tmp_path / "cache")
    assert export.verified_onnx(model, info, int8=False) == fresh


def test_reference_images_fall_back_to_pydicom_data(tmp_path, cxr_dicom):
    config = {"data": {"labels_csv": str(tmp_path / "gone.csv"), "images_root": str(tmp_path)}}
    assert fp32check.reference_images(config) == [cxr_dicom]
    assert fp32check.reference_images(None) == [cxr_dicom]
