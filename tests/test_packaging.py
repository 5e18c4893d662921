"""The built wheel works on its own: demo model, prompts, review app and migrations all ship inside it.

The wheel is built from a copy of the checkout, installed into a fresh venv that reuses this environment's
dependencies through a `.pth` line (no downloads; `.pth` files in that directory, such as the editable
install's finder, are not processed, so the checkout stays invisible), and run from a temporary directory.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT

from medvit.data.dicom import read_image
from medvit.findings import NIH_FINDINGS
from medvit.inference.predictor import Predictor
from medvit.resources import DEMO_RUN
from medvit.runs import CALIBRATION, CARD, CONFIG, METRICS, OOD, SUMMARY, WEIGHTS

pytestmark = pytest.mark.slow

# Runs inside the installed venv: where everything was found, and a review store migrated from the wheel's scripts.
_PROBE = """
import argparse, json, sys
from pathlib import Path
import medvit
from medvit.cli import build_parser
from medvit.commands.review import build_command
from medvit.resources import DEFAULT_PROMPTS, DEMO_RUN
from medvit.review.store import ReviewStore, schema_revision
from medvit.zeroshot.prompts import load_prompt_config

args = build_parser("review").parse_args(["review"])
cmd, _ = build_command(args)
store = ReviewStore(sys.argv[1])
revision = schema_revision(store.engine)
store.close()
print(json.dumps({
    "medvit": medvit.__file__, "app": cmd[4], "demo": str(DEMO_RUN), "prompts": str(DEFAULT_PROMPTS),
    "n_prompt_findings": len(load_prompt_config().phrases), "revision": revision,
}))
"""


def _copy_source(dest: Path) -> Path:
    """What a source distribution holds, outside the checkout, so the build never writes into the repo."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "medvit", dest / "medvit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _fresh_venv(path: Path) -> tuple[Path, Path]:
    """A venv without pip or packages of its own; this environment's site-packages are appended through a .pth."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    (Path(purelib) / "_medvit_test_deps.pth").write_text("".join(f"{p}\n" for p in sorted(ours) if Path(p).is_dir()))
    return python, Path(purelib)


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def test_wheel_installed_in_a_fresh_venv_predicts_and_finds_its_app(tmp_path: Path, cxr_dicom: str) -> None:
    dicom = cxr_dicom
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(_copy_source(tmp_path / "src"))], check=True, capture_output=True)
    (wheel,) = wheels.glob("medvit-*.whl")
    python, purelib = _fresh_venv(tmp_path / "venv")
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MEDVIT_RUN", "MEDVIT_BACKEND",
                                                           "MEDVIT_PROMPTS", "MEDVIT_DB_URL", "VIRTUAL_ENV")}
    env["MEDVIT_CACHE"] = str(tmp_path / "cache")
    # --ignore-installed: the dev install's metadata is visible through the .pth and must not be uninstalled.
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
         work, env)
    installed = purelib / "medvit"
    demo_before = _tree(installed / "resources" / "demo")
    for name in (CONFIG, WEIGHTS, CALIBRATION, METRICS, SUMMARY, CARD, OOD):
        assert (installed / "resources" / "demo" / name).is_file(), f"the wheel lacks the demo run's {name}"
        assert filecmp.cmp(installed / "resources" / "demo" / name, DEMO_RUN / name, shallow=False), name

    for name in ("index.html", "viewer.js"):  # the review viewer's built bundle: the wheel needs no npm
        bundle = Path("review") / "viewer_frontend" / "build" / name
        assert filecmp.cmp(installed / bundle, DEMO_RUN.parents[1] / bundle, shallow=False), name
    assert not list(installed.rglob("node_modules")), "the wheel carries the viewer's npm build folder"

    _run([str(python.parent / "medvit"), "predict", dicom, "--backend", "torch", "--out", "preds.csv"], work, env)
    rows = pd.read_csv(work / "preds.csv")
    assert rows["error"].isna().all(), rows["error"].dropna().tolist()
    assert rows["finding"].tolist() == list(NIH_FINDINGS)
    expected = Predictor.from_dir(DEMO_RUN, backend="torch").predict(read_image(dicom)).table
    assert rows["threshold"].tolist() == pytest.approx(expected["threshold"].tolist(), abs=1e-12)
    assert rows["prob"].tolist() == pytest.approx(expected["prob"].tolist(), abs=1e-5)  # batch path: same model
    assert _tree(installed / "resources" / "demo") == demo_before, "predict wrote into the installed package"

    probe = json.loads(_run([str(python), "-c", _PROBE, f"sqlite:///{tmp_path / 'reviews.sqlite3'}"], work, env)
                       .stdout.strip().splitlines()[-1])
    for key in ("medvit", "app", "demo", "prompts"):
        assert Path(probe[key]).is_relative_to(installed), f"{key} came from {probe[key]}, not the wheel"
        assert Path(probe[key]).exists(), probe[key]
    assert Path(probe["app"]) == installed / "review" / "page.py"  # the page script `medvit review` runs
    assert probe["n_prompt_findings"] > 0
    assert probe["revision"] is not None, "the review store found no Alembic migrations in the wheel"
    _run([str(python.parent / "medvit"), "review", "--help"], work, env)
