"""The out-of-distribution check reads the served pass's own features where they are faithful (no second forward),
else a second fp32 graph pass, else an eager one; graphs carry a features output, and older graphs without it are
re-exported. Uses the shipped demo (a 3-member ensemble with its OOD statistics) and a real hand CR."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _nonchest import nonchest_crs
from conftest import testdata as dicom_path

from medvit.data.dicom import read_image
from medvit.inference import features as feature_source
from medvit.inference.engines import create_backend, unavailable_reason
from medvit.inference.export import FILENAMES, verified_graph
from medvit.inference.fp32check import feature_drift, reference_inputs
from medvit.inference.predictor import Predictor, load_model
from medvit.resources import DEMO_RUN
from medvit.runs import EXPORTS


@pytest.fixture(scope="module")
def _graphs(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _cache(_graphs, monkeypatch):
    """One graph cache for the module: the demo's graphs are exported and verified once."""
    monkeypatch.setenv("MEDVIT_CACHE", str(_graphs))
    monkeypatch.delenv("MEDVIT_BACKEND", raising=False)


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    """A real hand CR without body-part tags: the check must warn about it."""
    path = tmp_path_factory.mktemp("hand") / "hand.dcm"
    ds = next(ds for name, ds in nonchest_crs() if name.startswith("RG3"))
    ds.save_as(path, enforce_file_format=True)
    return read_image(path, min_side=64)


def _count_eager_passes(predictor: Predictor, monkeypatch) -> list[int]:
    calls = [0]
    inner = predictor.model.forward_features

    def spy(x):
        calls[0] += 1
        return inner(x)

    monkeypatch.setattr(predictor.model, "forward_features", spy)
    return calls


@pytest.mark.parametrize("kind", ["onnx", "openvino"])
def test_graph_features_match_eager_fp32(kind, tmp_path):
    if reason := unavailable_reason(kind):
        pytest.skip(reason)
    model, info = load_model(DEMO_RUN)
    x = reference_inputs(info.config, info.preprocessing, n=3)
    engine = create_backend(kind, model, input_size=info.preprocessing["input_size"], work_dir=tmp_path,
                            graph_provider=lambda k: feature_source.verified_engine(model, info, k, x))
    logits, features = engine.run(x)
    with torch.inference_mode():
        ref_logits, ref_features = model(torch.as_tensor(x)), model.forward_features(torch.as_tensor(x))
    assert features is not None and features.shape == tuple(ref_features.shape) == (len(x), 3 * 128)
    assert np.abs(features - ref_features.numpy()).max() < 1e-4
    assert np.abs(logits - ref_logits.numpy()).max() < 1e-4


def test_served_features_feed_the_check_without_a_second_pass(hand, monkeypatch):
    reference = Predictor.from_dir(DEMO_RUN, backend="torch").predict(hand).warnings
    assert len(reference) == 1 and reference[0].startswith("out of distribution")
    predictor = Predictor.from_dir(DEMO_RUN, backend="onnx")
    calls = _count_eager_passes(predictor, monkeypatch)
    pred = predictor.predict(hand)
    assert pred.warnings == reference and pred.backend == "onnx"
    assert calls == [0] and predictor.features is not None and predictor.features.engine() is predictor.backend


def test_features_too_far_from_fp32_take_the_fp32_graph_then_an_eager_pass(hand, monkeypatch):
    reference = Predictor.from_dir(DEMO_RUN, backend="torch").predict(hand).warnings
    predictor = Predictor.from_dir(DEMO_RUN, backend="onnx-int8")
    x = reference_inputs(predictor.info.config, predictor.info.preprocessing, n=2)
    drift = feature_drift(predictor.backend, predictor.model, x, predictor.ood)
    assert drift is not None and drift > 1e-3  # int8 features do move: the bound below rejects them
    monkeypatch.setattr(feature_source, "FEATURE_DRIFT", 1e-3)
    calls = _count_eager_passes(predictor, monkeypatch)
    pred = predictor.predict(hand)
    assert pred.warnings == reference and calls == [0]
    assert pred.backend == predictor.features.engine().name == "onnx"  # the verified fp32 graph scored it alone
    chest = read_image(dicom_path("RG1_UNCI.dcm"), min_side=64)  # tagged CHEST: no check, the served engine
    assert predictor.predict(chest).backend == "onnx-int8"
    batch = np.stack([predictor.preprocess(im).numpy() for im in (hand, chest)])
    mixed = predictor.predict_inputs(batch, [True, False])
    assert [p.backend for p in mixed] == ["onnx", "onnx-int8"] and mixed[0].warnings == reference
    assert np.allclose(mixed[0].table["prob"], pred.table["prob"], atol=1e-5)

    monkeypatch.setattr(feature_source, "unavailable_reason", lambda name: "not installed here")
    predictor.features = feature_source.FeatureSource(predictor.model, predictor.info, predictor.backend, predictor.ood)
    pred = predictor.predict(hand)
    assert pred.warnings == reference and pred.backend == "onnx-int8"
    assert calls == [1] and predictor.features.engine() is None  # the check's own eager pass


def test_a_graph_without_the_features_output_is_exported_again(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVIT_CACHE", str(tmp_path))  # edits its exports.json: not the shared cache
    model, info = load_model(DEMO_RUN)
    x = reference_inputs(info.config, info.preprocessing, n=2)
    path = verified_graph(model, info, "onnx", x)
    exports = json.loads((path.parent / EXPORTS).read_text())
    assert exports[FILENAMES["onnx"]]["outputs"] == ["logits", "features"]
    del exports[FILENAMES["onnx"]]["outputs"]  # as written before graphs had a features output
    (path.parent / EXPORTS).write_text(json.dumps(exports))
    before = path.stat().st_mtime_ns
    assert verified_graph(model, info, "onnx", x) == path and path.stat().st_mtime_ns != before
    assert json.loads((path.parent / EXPORTS).read_text())[FILENAMES["onnx"]]["outputs"] == ["logits", "features"]
