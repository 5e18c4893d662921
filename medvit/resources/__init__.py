"""Files that ship inside the package (demo run, default prompts, the app page), found from a wheel or a checkout.

They are located through `importlib.resources`, never relative to the working directory or the repository, so an
installed medvit runs from any folder. Package data is installed as plain files (pyproject's package-data), and the
demo run is opened as a folder, so these are real filesystem paths; a zipped install is not supported.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def resource_path(package: str, name: str) -> Path:
    """The filesystem path of `name` inside `package` (the package's own directory, wheel or checkout)."""
    return Path(str(files(package) / name))


DEMO_RUN = resource_path(__name__, "demo")
DEFAULT_PROMPTS = resource_path(__name__, "prompts.yaml")
APP_SCRIPT = resource_path("medvit.review", "page.py")  # the Streamlit page script `medvit review` runs
