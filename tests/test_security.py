"""Security: no pickles are ever loaded, the app is not exposed by default, inputs are capped, and free text is
stored as data, never as SQL.

How the code is spelled (no pickle/torch.load/np.load, no SQL built from strings, no eval/exec, no unsafe YAML)
is checked by `make lint` (ruff S301, S608, S307, S102, S506 and the banned APIs in pyproject.toml), not here.

Malicious pickles here are real: unpickling them would create a marker file, so "refused" is checked by the
marker's absence as well as by the error.
"""

from __future__ import annotations

import ast
import contextlib
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port

from medvit._io import load_tensors
from medvit.cli import main as cli_main
from medvit.errors import CheckpointError, ImageTooLargeError, MedvitError
from medvit.runs import CONFIG, WEIGHTS, load_run

ROOT = Path(__file__).resolve().parents[1]


class _Exploit:
    """Unpickling this runs `touch marker`: the pickle payload of a hostile checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pickle(path: Path, marker: Path) -> Path:
    import torch

    torch.save({"state_dict": _Exploit(marker)}, path)  # a torch zip pickle, as .pt/.pth/.bin files are
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from _inference_run import make_tiny_run

    return make_tiny_run(tmp_path_factory.mktemp("run") / "run")


# ------------------------------------------------------------------------------------------- model loading


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "pytorch_model.bin", "model.ckpt"])
def test_a_run_folder_with_only_a_pickle_is_refused(name, tiny_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG).write_bytes((tiny_run / CONFIG).read_bytes())
    marker = tmp_path / "pwned"
    _evil_pickle(run / name, marker)
    with pytest.raises(CheckpointError, match=f"pickle.*{name}.*refuses|{name}.*refuses"):
        load_run(run)
    with pytest.raises(CheckpointError, match="refuses"):
        load_tensors(run / name)
    assert not marker.exists()


def test_a_pickle_renamed_safetensors_is_refused_without_running_it(tiny_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG).write_bytes((tiny_run / CONFIG).read_bytes())
    marker = tmp_path / "pwned"
    _evil_pickle(run / WEIGHTS, marker)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_run(run)
    assert not marker.exists()


def test_cli_refuses_a_pickle_run_with_one_line(tiny_run, tmp_path, capsys, cxr_dicom):
    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG).write_bytes((tiny_run / CONFIG).read_bytes())
    marker = tmp_path / "pwned"
    _evil_pickle(run / "model.pth", marker)
    code = cli_main(["predict", "--run", str(run), "--backend", "torch", cxr_dicom])
    out, err = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in out + err
    [line] = [x for x in err.splitlines() if x.startswith("error: ")]
    assert "model.pth" in line and "refuses" in line
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_weights_file_refuses_pickles_with_a_clear_error(suffix, tmp_path):
    """`model.weights_file` (local pretrained weights for training) is loaded through timm: a pickle there must
    neither run nor surface as a raw torch/safetensors exception."""
    from medvit.config import ModelConfig
    from medvit.model.classifier import build_model

    marker = tmp_path / "pwned"
    weights = _evil_pickle(tmp_path / f"weights{suffix}", marker)
    cfg = ModelConfig(name="deit3_small_patch16_384", pretrained=True, weights_file=weights,
                      model_kwargs={"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 64})  # fmt: skip
    with pytest.raises(Exception) as info:
        build_model(cfg, 14)
    assert not marker.exists()
    assert isinstance(info.value, CheckpointError), f"raw {type(info.value).__name__}: {str(info.value)[:200]}"
    assert weights.name in str(info.value)


# ------------------------------------------------------------------------------------------- serving and limits


def _review_args(*argv: str):
    from medvit.cli import build_parser

    return build_parser("review").parse_args(["review", *argv])


def test_medvit_review_binds_to_localhost_by_default_and_caps_uploads(tmp_path):
    from conftest import self_signed_cert

    from medvit.commands.review import build_command

    cmd, env = build_command(_review_args())
    assert cmd[cmd.index("--server.address") + 1] in ("localhost", "127.0.0.1")
    assert int(cmd[cmd.index("--server.maxUploadSize") + 1]) == int(env["MEDVIT_MAX_UPLOAD_MB"]) <= 64
    assert cmd[cmd.index("--client.showErrorDetails") + 1] in ("none", "false")  # no tracebacks in the browser

    with pytest.raises(MedvitError, match="refusing to serve on 0.0.0.0"):  # beyond localhost: sign-in and TLS
        build_command(_review_args("--host", "0.0.0.0"))
    cert, key = self_signed_cert(tmp_path)
    site = ("--auth", "accounts", "--tls-cert", str(cert), "--tls-key", str(key))
    cmd, env = build_command(_review_args("--host", "0.0.0.0", "--max-upload-mb", "5", *site))
    assert cmd[cmd.index("--server.address") + 1] == "0.0.0.0"  # only when asked
    assert cmd[cmd.index("--server.maxUploadSize") + 1] == env["MEDVIT_MAX_UPLOAD_MB"] == "5"


def _listening(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on `port`, from /proc/net/tcp{,6} (Linux)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            host, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(host)
    return found


_LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1 as /proc/net prints them


def _start_server(cmd: list[str], env: dict[str, str], port: int) -> subprocess.Popen:
    """Start an app server in its own process group and wait (up to 120 s) until it listens on `port`."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not _listening(port) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    return proc


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc/net")
@pytest.mark.parametrize("launch", ["medvit review", "streamlit run apps/review.py"])
def test_the_running_app_listens_on_loopback_only(launch, tiny_run, tmp_path):
    """Start the real server both documented ways and look at the sockets it actually opened."""
    port = free_port()
    env = {**os.environ, "MEDVIT_RUN": str(tiny_run), "MEDVIT_DB_URL": f"sqlite:///{tmp_path / 'r.sqlite3'}"}
    if launch == "medvit review":
        cmd = [sys.executable, "-m", "medvit", "review", "--port", str(port), "--run", str(tiny_run)]
    else:
        cmd = [sys.executable, "-m", "streamlit", "run", "apps/review.py", "--server.port", str(port),
               "--server.headless", "true", "--browser.gatherUsageStats", "false"]  # fmt: skip
    proc = _start_server(cmd, env, port)
    try:
        addresses = _listening(port)
        assert addresses, f"the server never listened on {port} (exit {proc.poll()})"
        assert addresses <= _LOOPBACK, f"listening on {addresses}: reachable from other machines"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_sigterm_to_medvit_review_stops_its_streamlit_server(tiny_run, tmp_path):
    """A service manager stops `medvit review` with SIGTERM to its PID: the Streamlit child must go too."""
    port = free_port()
    env = {**os.environ, "MEDVIT_DB_URL": f"sqlite:///{tmp_path / 'r.sqlite3'}"}
    cmd = [sys.executable, "-m", "medvit", "review", "--port", str(port), "--run", str(tiny_run)]
    proc = _start_server(cmd, env, port)
    try:
        assert _listening(port), f"the server never listened on {port} (exit {proc.poll()})"
        proc.send_signal(15)  # the launcher only, as systemd or `kill PID` would
        proc.wait(timeout=40)
        deadline = time.monotonic() + 10
        while _listening(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _listening(port), "the Streamlit server outlived `medvit review`"
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone when the test passes
            os.killpg(proc.pid, 9)


def test_read_image_caps_bytes_and_pixels(monkeypatch):
    from medvit.data import dicom
    from medvit.data.dicom import read_image

    png = _png(100, 100)
    with pytest.raises(ImageTooLargeError, match="10,000 pixels is over the limit of 5,000"):
        read_image(png, max_pixels=5_000)
    monkeypatch.setattr(dicom, "MAX_FILE_BYTES", len(png) - 1)
    with pytest.raises(ImageTooLargeError, match="limit"):
        read_image(png)


def test_the_app_service_caps_upload_size():
    from medvit.review.service import check_upload

    with pytest.raises(ImageTooLargeError, match="upload limit of 1 MB"):
        check_upload(b"\0" * (2**20 + 1), "big.dcm", 2**20)
    check_upload(b"\0" * 2**20, "ok.dcm", 2**20)


def _png(h: int, w: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- free text as data

HOSTILE = [
    "'); DROP TABLE reviews; --",
    "x' OR '1'='1",
    "Robert\"); DELETE FROM review_verdicts WHERE 1=1; --",
    "%s %(note)s {note} :note ? $1",
    "line one\nline two\ttab \\ backslash \u00e9\u00e8 \u4e2d\u6587 \U0001f600",
    "<script>alert(1)</script>",
]


@pytest.fixture
def store(db_url):
    """A review store on a fresh database (SQLite, and PostgreSQL when configured: see conftest.db_url)."""
    from medvit.review.store import ReviewStore

    s = ReviewStore(db_url)
    yield s
    s.close()


def _add(store, **over):
    from medvit.review.store import ShownFinding

    kwargs = dict(reviewer="Dr R", image_uid="1.2.3.4", image_uid_kind="sop_instance_uid", model_name="m",
                  weights_sha256="ab" * 32, shown={"Effusion": ShownFinding(0.6, 0.4)},
                  verdicts={"Effusion": "agree"}, note="")  # fmt: skip
    kwargs.update(over)
    return store.add_review(**kwargs)


def test_sql_looking_free_text_round_trips_verbatim(store):
    ids = [_add(store, note=text, reviewer=text[:100] or "r") for text in HOSTILE]
    reviews = {r.id: r for r in store.history(limit=None)}
    assert store.count() == len(HOSTILE)  # nothing dropped or deleted
    for rid, text in zip(ids, HOSTILE, strict=True):
        assert reviews[rid].note == text.strip()
        assert reviews[rid].reviewer == text[:100].strip()
        assert reviews[rid].verdicts == {"Effusion": "agree"}
    assert len(store.history(reviewer="x' OR '1'='1")) == 1  # a filter value, not a condition


def test_free_text_is_length_limited(store):
    from medvit.review.store import NOTE_MAX, REVIEWER_MAX

    _add(store, note="n" * NOTE_MAX, reviewer="r" * REVIEWER_MAX)
    with pytest.raises(MedvitError, match=f"note is {NOTE_MAX + 1} characters long"):
        _add(store, note="n" * (NOTE_MAX + 1))
    with pytest.raises(MedvitError, match="reviewer name is"):
        _add(store, reviewer="r" * (REVIEWER_MAX + 1))
    assert store.count() == 1


def test_the_app_limits_free_text_inputs():
    """The review form's text widgets carry the same limits the store enforces (Streamlit cuts typing there)."""
    from medvit.review.store import NOTE_MAX, REVIEWER_MAX

    ui = [*(ROOT / "apps").glob("*.py"), *(ROOT / "medvit" / "review").glob("*.py")]  # the page and its widgets
    source = "\n".join(p.read_text() for p in ui)
    tree = ast.parse(source)
    limits = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("text_input", "text_area"):
            label = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else "?"
            limits[label] = next((ast.unparse(k.value) for k in node.keywords if k.arg == "max_chars"), None)
    assert limits.get("Reviewer name") == "REVIEWER_MAX" and limits.get("Note") == "NOTE_MAX", limits
    assert REVIEWER_MAX <= 200 and NOTE_MAX <= 10_000


def test_no_patient_identifier_parameters_in_the_store_api():
    import inspect

    from medvit.review.store import ReviewStore

    params = set(inspect.signature(ReviewStore.add_review).parameters)
    assert not params & {"patient_name", "patient_id", "birth_date", "patient_birth_date", "accession_number"}


def test_the_exploit_really_runs_when_unpickled(tmp_path):
    """Guard for the tests above: the payload executes under an unsafe load, so its absence there means refusal."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Exploit(marker)))  # noqa: S301 - deliberately unsafe, on our own payload
    assert marker.exists()
