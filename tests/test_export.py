"""`medvit export`: verified ONNX/TorchScript with checksums; a graph that disagrees with torch is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from _inference_run import make_tiny_run

from medvit._io import sha256_file
from medvit._platform import int8_dot_product, isa_flags
from medvit.cli import main
from medvit.errors import CheckpointError
from medvit.inference import export, fp32check, graphs
from medvit.inference.engines import OnnxBackend, TorchBackend, unavailable_reason
from medvit.inference.graphs import int8_scheme
from medvit.inference.predictor import load_model

ISA = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"}


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


def test_int8_exports_match_fp32_or_are_refused_with_the_reason_and_one_passes_on_this_cpu(run):
    """Per ISA: ORT and NNCF int8 either match fp32 within 0.02 or are refused, naming the scheme and the drift.

    The scheme follows the CPU (full-range weights with VNNI/AMX, 7-bit weights on AVX2), and with it at least
    one int8 engine must hold on every x86 CPU this project runs on (AVX2, AVX-512 VNNI, AMX).
    """
    kinds = [k for k in ("onnx-int8", "openvino-int8") if unavailable_reason(k) is None]
    assert "onnx-int8" in kinds, "onnxruntime is a test dependency: int8 must be exercised, not skipped"
    scheme = int8_scheme()
    assert scheme.reduce_range == (not int8_dot_product())
    passed = []
    for kind in kinds:
        fmt = kind.removesuffix("-int8")
        try:
            result = export.export_run(run, fmt, int8=True)
        except CheckpointError as e:
            assert f"({scheme.name}: {scheme.why})" in str(e) and "max |dp|" in str(e)
            assert not (run / export.FILENAMES[kind]).exists(), "a refused int8 graph is never written"
            continue
        assert result.verification.max_abs_dp <= export.TOLERANCE[kind]
        assert json.loads((run / "exports.json").read_text())[result.path.name]["int8_scheme"] == scheme.name
        assert result.path.stat().st_size < (run / "model.safetensors").stat().st_size or kind.startswith("openvino")
        passed.append(kind)
    assert passed, f"no int8 engine matches fp32 on this CPU ({sorted(isa_flags() & ISA)})"


def test_openvino_and_torchscript_exports_round_trip(run, cxr_dicom):
    ts = export.export_run(run, "torchscript")
    assert ts.verification.max_abs_dp <= 1e-4
    if unavailable_reason("openvino"):
        pytest.skip(f"openvino: {unavailable_reason('openvino')}")
    ov = export.export_run(run, "openvino")
    assert ov.path.name == "model.openvino.xml" and ov.path.with_suffix(".bin").is_file()
    assert ov.verification.max_abs_dp <= 1e-4
    record = json.loads((run / "exports.json").read_text())["model.openvino.xml"]
    assert record["sha256"] == ov.sha256 and record["weights_sha256"] == sha256_file(run / "model.safetensors")
    model, info = load_model(run)
    assert export.verified_graph(model, info, "openvino") == ov.path, "the run's own verified IR is reused"
    ov.path.with_suffix(".bin").write_bytes(b"stale weights")  # a stale .bin beside a current .xml is caught
    assert export.verified_graph(model, info, "openvino") != ov.path


def test_verified_graph_reuses_current_exports_and_replaces_stale_ones(run, tmp_path):
    model, info = load_model(run)
    exported = export.export_run(run, "onnx").path
    assert export.verified_graph(model, info, "onnx") == exported
    (run / "model.onnx").write_bytes(b"tampered")  # checksum no longer matches: export again into the cache
    fresh = export.verified_graph(model, info, "onnx")
    assert fresh != exported and fresh.is_relative_to(tmp_path / "cache")
    assert export.verified_graph(model, info, "onnx") == fresh


def test_reference_images_fall_back_to_pydicom_data(tmp_path, cxr_dicom):
    config = {"data": {"labels_csv": str(tmp_path / "gone.csv"), "images_root": str(tmp_path)}}
    assert fp32check.reference_images(config) == [cxr_dicom]
    assert fp32check.reference_images(None) == [cxr_dicom]


def test_every_check_includes_the_chest_dicom_beside_the_runs_own_images(run, cxr_dicom):
    """A PACS sends windowed DICOMs, which the run's PNGs need not cover: the CR is checked first, always."""
    config = load_model(run)[1].config
    paths = fp32check.reference_images(config, n=3)
    assert paths[0] == cxr_dicom and len(paths) == 4
    assert all(Path(p).parent == Path(config["data"]["images_root"]) for p in paths[1:])


def test_exported_onnx_files_carry_findings_preprocessing_and_the_weights_hash(run):
    import onnxruntime as ort

    for fmt, extra in (("onnx", []), ("onnx", ["--int8"])):
        assert main(["export", "--run", str(run), "--format", fmt, *extra]) == 0
    config = json.loads((run / "config.json").read_text())
    for name in ("model.onnx", "model.int8.onnx"):
        props = {p.key: p.value for p in onnx.load(str(run / name)).metadata_props}
        assert json.loads(props["medvit.findings"]) == config["findings"]
        assert json.loads(props["medvit.preprocessing"]) == config["preprocessing"]
        assert props["medvit.weights_sha256"] == sha256_file(run / "model.safetensors")
        session = ort.InferenceSession(str(run / name), providers=["CPUExecutionProvider"])
        assert session.get_modelmeta().custom_metadata_map["medvit.weights_sha256"] == props["medvit.weights_sha256"]
        assert json.loads((run / "exports.json").read_text())[name]["sha256"] == sha256_file(run / name)
