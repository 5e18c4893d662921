"""One offline switch (medvit.hub): the hub probe, and hub weights failing at once with the download hint."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest

from medvit import hub
from medvit.config import ModelConfig
from medvit.errors import WeightsNotFoundError
from medvit.model.classifier import build_model

TINY = {"embed_dim": 64, "depth": 4, "num_heads": 2, "img_size": 64}
REAL = "deit3_base_patch16_384.fb_in22k_ft_in1k"


@pytest.fixture
def no_hub(monkeypatch, tmp_path: Path):
    """A hub endpoint that refuses connections, an empty HF cache, and no offline variables."""
    for var in (hub.OFFLINE_ENV, *hub.HUB_OFFLINE_VARS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    hub.hub_reachable.cache_clear()
    yield
    hub.hub_reachable.cache_clear()


def _cfg() -> ModelConfig:
    return ModelConfig(name=REAL, pretrained=True, model_kwargs=TINY, freeze_blocks=0, drop_path_rate=0.0)


def test_unreachable_hub_fails_at_once_with_the_download_hint(no_hub) -> None:
    assert hub.hub_reachable() is False and hub.use_local_files_only()
    with pytest.raises(WeightsNotFoundError) as e:
        build_model(_cfg(), 3)
    msg = str(e.value)
    assert "not in the local Hugging Face cache and the Hugging Face hub (127.0.0.1:9) cannot be reached" in msg
    assert f"https://huggingface.co/timm/{REAL}" in msg and "model.weights_file" in msg and "\n" not in msg


def test_offline_mode_is_named_in_the_error(no_hub, monkeypatch) -> None:
    monkeypatch.setenv(hub.OFFLINE_ENV, "1")
    assert hub.offline_requested() and hub.use_local_files_only()
    with pytest.raises(WeightsNotFoundError, match=r"offline mode is on \(--offline / MEDVIT_OFFLINE"):
        build_model(_cfg(), 3)


def test_a_hub_that_answers_is_reachable_whatever_the_status(monkeypatch) -> None:
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        hub.hub_reachable.cache_clear()
        assert hub.hub_reachable() is True
    finally:
        server.shutdown()
        server.server_close()
        hub.hub_reachable.cache_clear()


def test_set_offline_env_sets_every_library_variable(monkeypatch) -> None:
    for var in (hub.OFFLINE_ENV, *hub.HUB_OFFLINE_VARS):
        monkeypatch.delenv(var, raising=False)
    assert not hub.offline_requested() and hub.offline_requested(True)
    hub.set_offline_env()
    import os

    assert all(os.environ[v] == "1" for v in (hub.OFFLINE_ENV, *hub.HUB_OFFLINE_VARS))
