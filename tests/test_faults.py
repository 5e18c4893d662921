"""Faults: killed training runs, interrupted and failed writes, diverging losses, a full disk, killed and
concurrent writers of the feedback database. Nothing committed may be lost and nothing half-written may remain.

Faults are injected from outside the library: a child process is SIGKILLed at a point a small harness
(patched in the child only) announces through a marker file, so the kill lands exactly where intended
(mid-epoch, mid-write) instead of at a random moment. Training runs use the real smoke config on real
dev images (16 train + 8 val), so they are `slow` but stay in CI.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from medvit._io import save_tensors, sha256_file, write_json
from medvit.errors import MedvitError
from medvit.runs import WEIGHTS, load_run
from medvit.train.resume import LAST, STATE

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("MEDVIT_TEST_PG_URL", "")
TRAIN_TIMEOUT = 600  # one smoke training subprocess; normally 10-40 s on a shared 2-core box


# ------------------------------------------------------------------------------------------- helpers


def _python(code: str, *args: str, **popen) -> subprocess.Popen:
    """Start `python -c code args...` in the project venv, with a clean medvit logging setup."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, text=True, **popen)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    """Block until `path` exists (the child reached the fault point); fail if the child ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"child ended (exit {proc.returncode}) before the fault point:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"child did not reach the fault point within {timeout:.0f} s")
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def tiny_labels(dev_labels: Path, tmp_path_factory) -> Path:
    """16 train + 8 val real NIH images: 2 optimizer updates per epoch at the smoke batch size of 8."""
    df = pd.read_csv(dev_labels)
    small = pd.concat([df[df["split"] == "train"].head(16), df[df["split"] == "val"].head(8)])
    out = tmp_path_factory.mktemp("labels") / "labels.csv"
    small.to_csv(out, index=False)
    return out


def _train_argv(out: Path, labels: Path, images: Path, *extra: str, epochs: int = 3) -> list[str]:
    return ["train", "-c", str(ROOT / "configs" / "smoke.yaml"), "--out", str(out),
            "--set", f"data.labels_csv={labels}", "--set", f"data.images_root={images}",
            "--set", f"train.epochs={epochs}", *extra]  # fmt: skip


def _medvit(*argv: str, timeout: float = TRAIN_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medvit", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


# A child that trains through the real CLI and stops for the kill right after the first optimizer update of
# epoch 2: the model in memory has moved past the epoch-1 checkpoint, so only that checkpoint can resume it.
_TRAIN_UNTIL_MID_EPOCH = """
    import sys, time
    from pathlib import Path
    from medvit.train.engine import Engine
    marker = Path(sys.argv[1])
    original = Engine._optimizer_step
    def step(self):
        original(self)
        if self.state["global_step"] == self.updates_per_epoch + 1:
            marker.write_text("inside epoch 2")
            time.sleep(3600)
    Engine._optimizer_step = step
    from medvit.cli import main
    sys.exit(main(sys.argv[2:]))
"""

# A child that trains normally for one epoch and then sees a non-finite loss on every batch.
_TRAIN_THEN_DIVERGE = """
    import sys
    from medvit.train.engine import Engine
    bad = float(sys.argv[1])
    original = Engine._train_epoch
    def epoch(self, index):
        if index == 1:
            forward = self.task.criterion.forward
            self.task.criterion.forward = lambda *a, **k: forward(*a, **k) * bad
        return original(self, index)
    Engine._train_epoch = epoch
    from medvit.cli import main
    sys.exit(main(sys.argv[2:]))
"""


def _model_tensors(path: Path) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in load_file(str(path)).items() if k.startswith("model.")}


def _history(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "metrics.csv")[["epoch", "step", "train_loss", "val_loss", "val_mean_auroc"]]


# ------------------------------------------------------------------------------------------- training


@pytest.mark.slow
@pytest.mark.timeout(4 * TRAIN_TIMEOUT)
@pytest.mark.parametrize("augment", [True, False], ids=["augment", "no-augment"])
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(augment, tiny_labels, dev_images, tmp_path):
    extra = ("--set", f"data.augment.enabled={str(augment).lower()}")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    done = _medvit(*_train_argv(whole, tiny_labels, dev_images, *extra))
    assert done.returncode == 0, done.stderr

    marker = tmp_path / "mid-epoch"
    child = _python(_TRAIN_UNTIL_MID_EPOCH, str(marker), *_train_argv(broken, tiny_labels, dev_images, *extra),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(marker, child, TRAIN_TIMEOUT)
    _kill(child)
    state = json.loads((broken / STATE).read_text())
    assert state["epoch"] == 1  # the killed epoch is lost, the completed one is not
    assert len(_history(broken)) == 1

    resumed = _medvit("train", "--resume", str(broken))
    assert resumed.returncode == 0, resumed.stderr

    a, b = _history(whole), _history(broken)
    assert list(b["epoch"]) == [1, 2, 3]  # each epoch logged once, none repeated or skipped
    np.testing.assert_allclose(b.to_numpy(float), a.to_numpy(float), rtol=1e-5, atol=1e-6)
    wa, wb = _model_tensors(whole / LAST), _model_tensors(broken / LAST)
    assert wa.keys() == wb.keys()
    for key in wa:
        np.testing.assert_allclose(wb[key], wa[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.slow
@pytest.mark.timeout(2 * TRAIN_TIMEOUT)
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
    bad, tiny_labels, dev_images, tmp_path
):
    run = tmp_path / "run"
    child = _python(_TRAIN_THEN_DIVERGE, bad, *_train_argv(run, tiny_labels, dev_images),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    out, err = child.communicate(timeout=TRAIN_TIMEOUT)
    assert child.returncode == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"loss became {bad}" in errors[0] and "epoch 2" in errors[0], err
    assert "last good checkpoint" in errors[0]

    state = json.loads((run / STATE).read_text())
    assert state["epoch"] == 1 and state["tensors_sha256"] == sha256_file(run / LAST)
    model, info = load_run(run)  # the epoch-1 best weights, intact and finite
    assert all(np.isfinite(p.detach().numpy()).all() for p in model.parameters())
    assert not list(run.glob(".*.tmp"))


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(2 * TRAIN_TIMEOUT)
def test_full_disk_during_training_is_a_clear_error(tiny_labels, dev_images, tmp_path):
    """A real 2 MB tmpfs as the run folder (root only): the 3 MB resume state cannot be written."""
    disk = tmp_path / "small-disk"
    if not _mount_tmpfs(disk, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root); test_full_disk_on_write_* covers ENOSPC")
    try:
        done = _medvit(*_train_argv(disk / "run", tiny_labels, dev_images, epochs=1))
        assert "Traceback" not in done.stderr, done.stderr[-2000:]
        assert done.returncode == 2
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "no space left" in errors[0].lower(), done.stderr[-2000:]
        assert not list((disk / "run").glob(".*.tmp"))  # no partial file left behind to fill the disk further
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# ------------------------------------------------------------------------------------------- atomic writes


WRITERS = ["weights", "state.json", "calibration.json", "metrics.json"]


def _writers(tmp_path: Path):
    """{name: (target file, function writing new content to it)} for the files medvit writes atomically,
    each through its real writer."""
    from medvit.evaluate.calibration import Calibration, Temperature
    from medvit.evaluate.report import write_metrics

    calibration = Calibration(("Effusion",), (Temperature(2.0),), np.array([0.4]), "temperature")
    return {
        "weights": (tmp_path / WEIGHTS, lambda p: save_tensors(p, {"w": _tensor(2.0)})),
        "state.json": (tmp_path / STATE, lambda p: write_json(p, {"epoch": 2})),
        "calibration.json": (tmp_path / "calibration.json", calibration.save),
        "metrics.json": (tmp_path / "metrics.json", lambda p: write_metrics({"auroc": 0.5}, p)),
    }


def _tensor(value: float):
    import torch

    return torch.full((256, 256), value)


@pytest.mark.parametrize("writer", WRITERS)
def test_full_disk_on_write_keeps_the_old_file_and_gives_a_clear_error(writer, tmp_path, monkeypatch):
    """ENOSPC at fsync (where a full disk surfaces for buffered writes): the old file stays, no temp file remains,
    and the error is a MedvitError (the CLI's one line), not a raw OSError traceback."""
    path, write = _writers(tmp_path)[writer]
    path.write_bytes(b"old content")

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(Exception) as info:
        write(path)
    assert path.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert isinstance(info.value, MedvitError), f"raw {type(info.value).__name__} would reach the user: {info.value}"
    assert "no space left" in str(info.value).lower()


# The child writes new content through the real writer, announcing when it is inside the write (between the
# data reaching the temp file and the rename), and waits there to be killed.
_KILL_DURING_WRITE = """
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from test_faults import _writers
    marker, folder = Path(sys.argv[1]), Path(sys.argv[2])
    real_fsync = os.fsync
    def fsync(fd):
        real_fsync(fd)
        marker.write_text("inside the write")
        time.sleep(3600)
    os.fsync = fsync
    path, write = _writers(folder)[sys.argv[4]]
    write(path)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("writer", WRITERS)
def test_sigkill_during_a_write_leaves_the_old_file_intact(writer, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    path, write = _writers(folder)[writer]
    write(path)  # the old, complete version
    old = path.read_bytes()
    marker = tmp_path / "inside"
    child = _python(_KILL_DURING_WRITE, str(marker), str(folder), str(Path(__file__).parent), writer,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    _wait_for(marker, child, 90)
    _kill(child)
    assert path.read_bytes() == old
    if writer == "weights":
        assert float(load_file(str(path))["w"][0, 0]) == 2.0
    else:
        json.loads(path.read_text())


# ------------------------------------------------------------------------------------------- feedback database

_SHOWN = {"Effusion": (0.62, 0.40), "Cardiomegaly": (0.08, 0.30)}

# One writer process: opens the store at argv[1] and adds argv[3] reviews as reviewer argv[2], printing each id
# as soon as add_review has returned (i.e. the transaction is committed).
_WRITER = """
    import sys
    from medvit.review.store import ReviewStore, ShownFinding
    url, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = ReviewStore(url)
    shown = {"Effusion": ShownFinding(0.62, 0.40), "Cardiomegaly": ShownFinding(0.08, 0.30)}
    for i in range(n):
        rid = store.add_review(reviewer=who, image_uid=f"1.2.826.0.1.{i}", image_uid_kind="sop_instance_uid",
                               model_name="tiny", weights_sha256="ab" * 32, shown=shown,
                               verdicts={"Effusion": "agree", "Cardiomegaly": "disagree"}, note=f"{who}/{i}")
        print(rid, flush=True)
    store.close()
"""


def _open(url: str):
    from medvit.review.store import ReviewStore

    return ReviewStore(url)


def _assert_complete(store, expected_ids: set[int]) -> None:
    """Every expected review is there, each with both verdicts and what was shown (no half-written review)."""
    reviews = {r.id: r for r in store.history(limit=None)}
    assert expected_ids <= reviews.keys(), f"{len(expected_ids - reviews.keys())} committed reviews lost"
    for r in reviews.values():
        assert r.verdicts == {"Effusion": "agree", "Cardiomegaly": "disagree"}, r
        assert set(r.shown) == set(_SHOWN)


@pytest.mark.timeout(300)
def test_a_killed_writer_loses_no_committed_review(db_url, tmp_path):
    _open(db_url).close()  # create the schema first, as the app does at start
    child = _python(_WRITER, db_url, "killed", "100000", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    committed: set[int] = set()
    for line in child.stdout:  # the ids the child saw committed
        committed.add(int(line))
        if len(committed) >= 40:
            break
    _kill(child)  # mid-loop: most likely inside the next transaction
    committed.update(int(line) for line in child.stdout.read().split())

    store = _open(db_url)
    try:
        _assert_complete(store, committed)
        if store.engine.dialect.name == "sqlite":
            with store.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        store.add_review(reviewer="after", image_uid="1.2.3", image_uid_kind="sop_instance_uid", model_name="m",
                         weights_sha256="ab" * 32, shown=_shown(), verdicts={"Effusion": "agree"})  # still writable
    finally:
        store.close()


def _shown():
    from medvit.review.store import ShownFinding

    return {k: ShownFinding(p, t) for k, (p, t) in _SHOWN.items()}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_eight_concurrent_writer_processes_lose_nothing(db_url):
    writers, per_writer = 8, 500
    _open(db_url).close()
    children = [_python(_WRITER, db_url, f"w{k}", str(per_writer), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for k in range(writers)]  # fmt: skip
    ids: list[int] = []
    for child in children:
        out, err = child.communicate(timeout=800)
        assert child.returncode == 0, err[-2000:]
        ids += [int(x) for x in out.split()]
    assert len(ids) == len(set(ids)) == writers * per_writer

    store = _open(db_url)
    try:
        assert store.count() == writers * per_writer
        _assert_complete(store, set(ids))
        notes = {r.note for r in store.history(limit=None)}
        assert notes == {f"w{k}/{i}" for k in range(writers) for i in range(per_writer)}
    finally:
        store.close()


def test_schema_is_versioned_with_one_migration_head_and_upgrades_in_place(tmp_path):
    """The schema carries an Alembic revision; the migration scripts form one line; opening a store on an
    existing database migrates it to head without touching the reviews already there."""
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine

    from medvit.review.store import migrate, schema_revision

    scripts = ScriptDirectory(str(ROOT / "medvit" / "review" / "migrations"))
    heads = scripts.get_heads()
    assert len(heads) == 1, f"migrations branch: {heads}"
    chain = list(scripts.walk_revisions())
    assert chain[-1].down_revision is None  # one base

    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    store = _open(url)
    assert schema_revision(store.engine) == heads[0]
    rid = store.add_review(reviewer="r", image_uid="1.2.3", image_uid_kind="sop_instance_uid", model_name="m",
                           weights_sha256="ab" * 32, shown=_shown(), verdicts={"Effusion": "agree"}, note="kept")
    store.close()

    engine = create_engine(url)
    migrate(engine, "head")  # idempotent on an up-to-date database
    assert schema_revision(engine) == heads[0]
    engine.dispose()
    store = _open(url)
    try:
        [review] = store.history()
        assert (review.id, review.note) == (rid, "kept")
    finally:
        store.close()
