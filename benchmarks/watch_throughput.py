"""`medvit watch --once` throughput against `medvit predict` on the same images, in one run (issue 11).

N copies of pydicom-data's RG1_UNCI chest CR (1955 x 1841, 16-bit, uncompressed), each with new study, series
and instance UIDs, are written to a folder and uploaded to a real Orthanc (DICOMweb plugin, authentication on)
that this script starts on 127.0.0.1 and stops by its PID. One Predictor (the demo model by default, the engine
`auto` picks here unless `--backend` names one) serves both sides, so model loading is left out of both:

- **predict**: `medvit.inference.batch.predict_files` over the folder, as `medvit predict --out` runs it
  (batch 8, parallel decoding workers);
- **predict, one by one**: `read_image` + `Predictor.predict` per file;
- **watch**: `Watcher.run_pass` against the PACS, as `medvit watch --once` runs it: QIDO, then per batch of
  `--batch-size` rows one transaction: WADO-RS retrieve + decode in threads, one forward, SR builds, one
  STOW-RS request, the database commit (fresh SQLite each round).

The rounds alternate (predict, serial, watch) `--rounds` times; medians are reported, with the load average
before and after, and the CPU seconds per image of medvit (with its reaped child processes) and of Orthanc with
the number of cores they kept busy. Inside watch, each WADO-RS retrieve and each STOW-RS request is timed by
wrapping the client's calls: retrieves overlap (threads), so their latency is reported per call, not as a share
of the wall time.
Target: the PACS round trip costs at most 25 %, i.e. watch throughput >= 0.8 x predict's.

    python benchmarks/watch_throughput.py [--images 48] [--rounds 3] [--run RUN_DIR | --random-init CONFIG]
        [--backend auto] [--batch-size 8]

`--random-init configs/deit3_384_nih.yaml` measures the product architecture (DeiT3-B/16-384) without its
weights, which cannot be downloaded here: the config's model with `pretrained: false`, written as a run folder
by medvit's checkpoint code (temperature-1 calibration, thresholds 0.5). Throughput does not depend on the
weights' values; pass an explicit `--backend` (e.g. onnx-int8) so that `auto`'s self-check is not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import requests
import yaml
from _random_run import random_init_run
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

ORTHANC = Path("/usr/sbin/Orthanc")
PLUGINS = Path("/usr/share/orthanc/plugins")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_orthanc(root: Path, user: str, password: str) -> tuple[subprocess.Popen, str]:
    """A private Orthanc (temp storage, auth on, localhost only); returns (process, DICOMweb root)."""
    port = _free_port()
    root.mkdir(parents=True, exist_ok=True)
    config = root / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "medvit-bench", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
        "HttpPort": port, "DicomPort": _free_port(), "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
        "RegisteredUsers": {user: password}, "Plugins": [str(PLUGINS / "libOrthancDicomWeb.so")],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }))  # fmt: skip
    proc = subprocess.Popen([str(ORTHANC), str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/system", auth=(user, password), timeout=1).ok:
                return proc, f"http://127.0.0.1:{port}/dicom-web"
        except requests.ConnectionError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("Orthanc did not start within 60 s")


def make_copies(folder: Path, n: int) -> list[Path]:
    """n copies of RG1_UNCI, each its own study/series/instance."""
    folder.mkdir(parents=True, exist_ok=True)
    source = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    paths = []
    for i in range(n):
        ds = source.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"cr{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _timed_calls(obj: Any, name: str, bucket: list[float]) -> None:
    """Wrap obj.name so each call's seconds are appended to `bucket`."""
    inner: Callable = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            bucket.append(time.perf_counter() - t0)

    setattr(obj, name, wrapper)


def _cpu_s(orthanc: subprocess.Popen) -> dict[str, float]:
    """CPU seconds used so far by this process (with its reaped children: predict's decoding workers) and by Orthanc."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    # /proc/PID/stat fields 14-15: user and system time in clock ticks (after the ")" that ends the command name)
    ticks = Path(f"/proc/{orthanc.pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]
    return {"medvit": own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime,
            "orthanc": sum(map(int, ticks)) / os.sysconf("SC_CLK_TCK")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48,
                        help="copies per round (at 16, starting predict's decoding workers made it slower than "
                             "the one-by-one loop)")
    parser.add_argument("--rounds", type=int, default=3)
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--run", default=None, help="run folder (default: the demo model)")
    model.add_argument("--random-init", type=Path, metavar="CONFIG",
                       help="a training config whose model is measured with random weights")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--batch-size", type=int, default=8, help="watch's batch (predict runs batch 8)")
    args = parser.parse_args(argv)
    if not ORTHANC.is_file():
        raise SystemExit(f"Orthanc not installed ({ORTHANC}): apt-get install orthanc orthanc-dicomweb")

    from medvit._platform import cpu_model, isa_flags
    from medvit.data.dicom import read_image
    from medvit.inference.batch import predict_files
    from medvit.inference.predictor import Predictor
    from medvit.pacs.client import PASSWORD_ENV, USER_ENV, PacsClient
    from medvit.pacs.watch import Watcher
    from medvit.review.store import ReviewStore

    user, password = "medvit", secrets.token_urlsafe(16)
    os.environ[USER_ENV], os.environ[PASSWORD_ENV] = user, password
    with tempfile.TemporaryDirectory(prefix="medvit-watchbench-") as tmp:
        root = Path(tmp)
        run = (random_init_run(yaml.safe_load(args.random_init.read_text())["model"], root / "run", calibrated=True)
               if args.random_init else args.run)
        predictor = Predictor.from_dir(run, backend=args.backend)
        load_start = os.getloadavg()[0]
        paths = make_copies(root / "in", args.images)
        proc, url = start_orthanc(root / "orthanc", user, password)
        try:
            for p in paths:
                r = requests.post(
                    url.removesuffix("/dicom-web") + "/instances",
                    data=p.read_bytes(),
                    auth=(user, password),
                    timeout=60,
                )
                r.raise_for_status()
            client = PacsClient(url)
            retrieve_s: list[float] = []
            store_s: list[float] = []
            _timed_calls(client, "retrieve_dataset", retrieve_s)
            _timed_calls(client, "store_many", store_s)
            times: dict[str, list[float]] = {"predict": [], "serial": [], "watch": []}
            cpu: dict[str, list[dict[str, float]]] = {name: [] for name in times}

            def timed(name: str, fn: Callable[[], Any]) -> Any:
                c0, t0 = _cpu_s(proc), time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - t0)
                c1 = _cpu_s(proc)
                cpu[name].append({who: c1[who] - c0[who] for who in c0})
                return out

            for k in range(args.rounds):
                summary = timed("predict", lambda: predict_files(predictor, paths, lambda rows: None, batch_size=8,
                                                                 progress=False))
                assert summary.n_predicted == len(paths), summary
                timed("serial", lambda: [predictor.predict(read_image(p, min_side=predictor.input_side))
                                         for p in paths])
                store = ReviewStore(f"sqlite:///{root / f'review{k}.db'}")
                try:
                    watcher = Watcher(client, predictor, store.engine, batch_size=args.batch_size)
                    result = timed("watch", watcher.run_pass)
                finally:
                    store.close()
                assert result.scored == len(paths), result
                print(
                    f"round {k + 1}: " + ", ".join(f"{name} {v[-1]:.2f} s" for name, v in times.items()),
                    file=sys.stderr,
                )
        finally:
            proc.terminate()  # this Orthanc only, by its PID
            proc.wait(timeout=30)
    med = {name: statistics.median(v) for name, v in times.items()}
    n = len(paths)
    per_round = args.rounds * n
    report = {
        "images": n,
        "rounds": args.rounds,
        "watch_batch_size": args.batch_size,
        "engine": predictor.backend.name,
        "model": predictor.info.model_name,
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "isa": sorted(isa_flags() & {"avx2", "avx512f", "avx512_vnni", "amx_tile"}),
        "load_avg_1m_start": load_start,
        "load_avg_1m_end": os.getloadavg()[0],
        "seconds_per_round": {name: v for name, v in times.items()},
        "images_per_s": {name: n / s for name, s in med.items()},
        "watch_vs_predict": med["predict"] / med["watch"],
        "watch_vs_serial_predict": med["serial"] / med["watch"],
        # CPU ms per image (medians over rounds) and cores kept busy: whether watch waits or competes for the CPU
        "cpu_ms_per_image": {name: {who: 1e3 * statistics.median(r[who] for r in rounds) / n for who in rounds[0]}
                             for name, rounds in cpu.items()},
        "cores_busy": {name: statistics.median(sum(r.values()) / t for r, t in zip(rounds, times[name], strict=True))
                       for name, rounds in cpu.items()},
        "ms_per_call": {"retrieve": 1e3 * statistics.median(retrieve_s),
                        "store_request": 1e3 * statistics.median(store_s)},
        "store_share_of_watch": sum(store_s) / sum(times["watch"]),
        "ms_per_instance": {"store": 1e3 * sum(store_s) / per_round},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
