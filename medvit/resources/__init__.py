"""Files that ship inside the package (demo run, default prompts, the app page), found from wheel or checkout."""

from __future__ import annotations

from importlib.resources import as_file, files
from pathlib import Path


def resource_path(name: str) -> Path:
    """A real filesystem path of a packaged resource (setuptools installs package data as plain files)."""
    with as_file(files(__name__) / name) as path:
        return Path(path)


DEMO_RUN = resource_path("demo")
DEFAULT_PROMPTS = resource_path("prompts.yaml")
APP_SCRIPT = Path(str(files("medvit.review") / "app.py"))
