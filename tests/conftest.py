"""Shared fixtures: real development data from ../shared and real DICOMs from pydicom-data."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DEV = Path(os.environ.get("MEDVIT_DEV_DATA", ROOT.parent / "shared" / "data" / "cxr14-dev"))


def free_port() -> int:
    """A port the OS just handed out on 127.0.0.1, so parallel test workers never share one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def own_medvit_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A MEDVIT_CACHE per test session, so per pytest-xdist worker: two workers never write the same exported graph
    or backend choice at once, and no test passes on a graph an earlier run left in the user cache."""
    folder = tmp_path_factory.mktemp("medvit-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDVIT_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def dev_data() -> Path:
    """The real NIH ChestX-ray14 development subset (labels.csv + images/); skipped when absent."""
    if not (SHARED_DEV / "labels.csv").is_file():
        pytest.skip(f"real dev data not found at {SHARED_DEV} (set MEDVIT_DEV_DATA or check out ../shared)")
    return SHARED_DEV


@pytest.fixture(scope="session")
def dev_labels(dev_data: Path) -> Path:
    return dev_data / "labels.csv"


@pytest.fixture(scope="session")
def dev_images(dev_data: Path) -> Path:
    return dev_data / "images"


@pytest.fixture(scope="session")
def dev_subset_csv(dev_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small labels CSV (24 train + 12 val real images) in the original NIH format, for fast end-to-end tests."""
    import pandas as pd

    df = pd.read_csv(dev_data / "labels.csv")
    small = pd.concat([df[df["split"] == "train"].head(24), df[df["split"] == "val"].head(12)])
    out = tmp_path_factory.mktemp("subset") / "labels.csv"
    small.to_csv(out, index=False)
    return out


def stored_reviews(url: str) -> list:
    """Every review in the database at `url`, read through a fresh engine: proof it really was committed."""
    from medvit.review.store import ReviewStore

    store = ReviewStore(url)
    try:
        return store.history(limit=None)
    finally:
        store.close()


def database_text(url: str) -> str:
    """Every value in every table of the database at `url` (reflected, so tables added later are searched too)."""
    from sqlalchemy import MetaData, create_engine, select

    engine = create_engine(url)
    try:
        meta = MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            return "\n".join(str(v) for table in meta.sorted_tables for row in conn.execute(select(table)) for v in row)
    finally:
        engine.dispose()


def testdata(name: str) -> str:
    """Path of a real DICOM from pydicom's test files / pydicom-data; skips if the package is missing."""
    try:
        from pydicom.data import get_testdata_file
    except ImportError:  # pragma: no cover
        pytest.skip("pydicom not installed")
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not available: install pydicom-data (`pip install -e .[dev]`)")
    return str(path)


def self_signed_cert(folder: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A real self-signed certificate for `name` (plus 127.0.0.1) and its key, made by the openssl CLI."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="session")
def cxr_dicom() -> str:
    """RG1_UNCI.dcm: a real 15-bit MONOCHROME1 PA chest CR."""
    return testdata("RG1_UNCI.dcm")


PG_URL = os.environ.get("MEDVIT_TEST_PG_URL", "")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """A fresh, empty review database: a SQLite file, or its own schema on $MEDVIT_TEST_PG_URL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'reviews.sqlite3'}"
        return
    if not PG_URL:
        pytest.skip('MEDVIT_TEST_PG_URL not set: run `eval "$(.ci/postgres.sh)"` to test against PostgreSQL')
    from sqlalchemy import create_engine, text

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in PG_URL else "?"
    yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def bad_corpus() -> ModuleType:
    """tests/data/bad/make_corpus.py (the bad-input corpus), loaded once by file path."""
    name = "medvit_bad_corpus"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "data" / "bad" / "make_corpus.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
