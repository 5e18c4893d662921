"""`torchrun -m medvit predict`: deterministic shards, one merged CSV equal to a single process, resume after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from _inference_run import make_tiny_run

from medvit.errors import MedvitError
from medvit.inference.shard import Shard, merge_parts, part_path

ENV = {"OMP_NUM_THREADS": "1", "MEDVIT_BACKEND": "torch"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, dev_data):
    return make_tiny_run(tmp_path_factory.mktemp("run") / "tiny", dev_data)


def test_shards_are_disjoint_cover_everything_and_do_not_depend_on_the_rank_order():
    paths = [Path(f"/x/{i:03d}.png") for i in range(11)]
    shards = [Shard(r, 3).select(paths) for r in range(3)]
    assert sorted(p for s in shards for p in s) == paths
    assert not set(shards[0]) & set(shards[1])
    assert shards == [Shard(r, 3).select(paths) for r in range(3)], "the same split on every call"


@pytest.mark.parametrize(("rank", "world"), [("2", "2"), ("-1", "2"), ("a", "2"), ("0", "0")])
def test_bad_torchrun_environment_is_refused(monkeypatch, rank, world):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(MedvitError):
        Shard.from_env()


def test_merge_refuses_a_missing_part(tmp_path):
    out = tmp_path / "preds.csv"
    part_path(out, 0, 2).write_text("file,finding\n")
    with pytest.raises(MedvitError, match="missing part"):
        merge_parts(out, [tmp_path / "a.png"], 2)


def _torchrun(args: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "medvit", "predict", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _rank_pid(parent: int, rank: str) -> int | None:
    """The pid of the torchrun worker with RANK=`rank` (a child of the torchrun process `parent`)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        worker = any(v.startswith(b"TORCHELASTIC_RUN_ID=") for v in environ)  # set by torchrun for its workers
        if worker and b"medvit" in cmdline and f"RANK={rank}".encode() in environ and int(proc.name) != parent:
            return int(proc.name)
    return None


@pytest.mark.slow
def test_torchrun_predict_equals_one_process_and_resumes_after_a_rank_is_killed(run, dev_images, tmp_path):
    images = sorted(dev_images.glob("*.png"))
    folder = tmp_path / "in"
    folder.mkdir()
    for p in images:
        (folder / p.name).symlink_to(p)
    (folder / "broken.dcm").write_bytes(b"not a dicom")  # an error row travels through the merge too
    env = {**os.environ, **ENV, "MEDVIT_CACHE": str(tmp_path / "cache")}
    # --run-dir, not --run: torchrun's own parser takes `--run` for an abbreviation of its --run-path
    common = [str(folder), "--run-dir", str(run), "--backend", "torch", "--batch-size", "1", "--workers", "0"]

    single = tmp_path / "single.csv"
    subprocess.run([sys.executable, "-m", "medvit", "predict", *common, "--out", str(single)], env=env, check=True,
                   capture_output=True, timeout=300)

    out = tmp_path / "sharded.csv"
    job = _torchrun([*common, "--out", str(out)], env)
    part1 = part_path(out, 1, 2)
    deadline = time.monotonic() + 180
    killed = False
    while time.monotonic() < deadline and job.poll() is None:
        if part1.is_file() and part1.read_text().count("\n") > 14 * 3:  # rank 1 has written a few images
            pid = _rank_pid(job.pid, "1")
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
        time.sleep(0.02)
    _, err = job.communicate(timeout=120)
    assert killed, f"rank 1 finished before it could be killed: {err[-2000:]}"
    assert job.returncode != 0 and not out.exists(), "a job with a dead rank must not write the merged CSV"
    done_before = pd.read_csv(part1)["file"].nunique()
    assert 0 < done_before < (len(images) + 1) // 2

    resumed = _torchrun([*common, "--out", str(out), "--resume"], env)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert not list(tmp_path.glob(".sharded.csv.part-*")), "parts are removed after the merge"
    a = pd.read_csv(single).sort_values(["file", "finding"]).reset_index(drop=True)
    b = pd.read_csv(out).sort_values(["file", "finding"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert a["file"].nunique() == len(images) + 1
    assert (b["error"].fillna("") != "").sum() == 1
