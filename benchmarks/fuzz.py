"""Long fuzzing run of medvit's input parsers: `read_image` (DICOM native/RLE/JPEG 2000, PNG, JPEG) and
`load_labels` (NIH and wide CSVs), on randomly mutated real files.

A *crash* is any exception that is not a `MedvitError`, or an input that takes longer than `--timeout`
seconds (a hang). Inputs run in a worker process, so a hang or a decoder segfault is counted (and the worker
restarted) instead of stopping the run. Crashing inputs are saved for reproduction.

    python benchmarks/fuzz.py --seconds 600            # prints inputs tried and crashes found

`tests/test_fuzz.py` is the short, hypothesis-driven version that CI runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
_SPECIALS = [b"\x00", b"\xff", b"\xff\xff\xff\xff", b"\x7f\xff", b"\x80\x00\x00\x00", b"\xfe\xff\x00\xe0"]
_CELLS = ["", "nan", "-1", "2", "../x.png", "/etc/passwd", "No Finding", "Effusion|", "|", "Pneumonitis",
          "training", '"a,b"', "\u00e9", "\x00", "1e309", "=cmd|' /C calc'!A0"]  # fmt: skip


def _corpus():
    path = ROOT / "tests" / "data" / "bad" / "make_corpus.py"
    spec = importlib.util.spec_from_file_location("medvit_bad_corpus", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def seeds() -> dict[str, bytes]:
    """Valid inputs to mutate: real CR headers with small pixel payloads in three encodings, rasters, CSVs."""
    from pydicom.uid import JPEG2000Lossless, RLELossless

    corpus = _corpus()
    ds = corpus.small_cr()
    arr = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ds.Rows, ds.Columns)[64:128, 64:128].copy()
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = arr.tobytes()
    out = {"dicom": corpus.dicom_bytes(ds)}
    for name, syntax in (("dicom_rle", RLELossless), ("dicom_j2k", JPEG2000Lossless)):
        try:
            compressed = corpus.small_cr()
            compressed.Rows, compressed.Columns = arr.shape
            compressed.PixelData = arr.tobytes()
            compressed.compress(syntax)
            out[name] = corpus.dicom_bytes(compressed)
        except Exception as e:  # noqa: BLE001 - an encoder plugin may be missing; fuzz the rest
            print(f"skipping {name} seed: {e}", file=sys.stderr)
    out["png"] = corpus.png_bytes(corpus.gradient(64, 64))
    out["jpeg"] = corpus.jpeg_bytes(corpus.gradient(64, 64))
    out["csv_nih"] = (corpus.NIH_HEADER + "\n" + "\n".join(corpus.GOOD_NIH_ROWS) + "\n").encode()
    out["csv_wide"] = b"Path,Patient ID,Effusion,Cardiomegaly\nimg0.png,p1,1,0\nimg1.png,p2,-1,\n"
    return out


def mutate(seed: bytes, rng: np.random.Generator, header: int) -> bytes:
    """1-8 random edits (bit flips, special values, truncation, insertion, deletion, repetition)."""
    data = bytearray(seed)
    for _ in range(int(rng.integers(1, 9))):
        if not data:
            break
        hi = min(len(data), header) if rng.random() < 0.7 else len(data)
        pos = int(rng.integers(0, max(hi, 1)))
        op = rng.integers(0, 6)
        if op == 0:
            data[min(pos, len(data) - 1)] ^= 1 << int(rng.integers(0, 8))
        elif op == 1:
            chunk = _SPECIALS[int(rng.integers(0, len(_SPECIALS)))]
            data[pos : pos + len(chunk)] = chunk
        elif op == 2:
            del data[pos:]
        elif op == 3:
            data[pos:pos] = rng.bytes(int(rng.integers(1, 17)))
        elif op == 4:
            del data[pos : pos + int(rng.integers(1, 65))]
        else:
            data[pos:pos] = data[pos : pos + int(rng.integers(1, 65))]
    return bytes(data)


def mutate_csv(seed: bytes, rng: np.random.Generator) -> bytes:
    """Replace cells with hostile values, then (half the time) mutate the bytes."""
    rows = [line.split(",") for line in seed.decode().splitlines()]
    for _ in range(int(rng.integers(0, 6))):
        row = rows[int(rng.integers(0, len(rows)))]
        row[int(rng.integers(0, len(row)))] = _CELLS[int(rng.integers(0, len(_CELLS)))]
    data = ("\n".join(",".join(r) for r in rows) + "\n").encode()
    return mutate(data, rng, len(data)) if rng.random() < 0.5 else data


def _worker(conn, images_root: str) -> None:
    """Run inputs sent over `conn`; reply ("ok" | "refused" | "crash", detail)."""
    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.CRITICAL)  # noqa: TID251 - this fuzz worker is its own process, and only decodes
    from medvit.data.datasets import load_labels
    from medvit.data.dicom import read_image
    from medvit.errors import MedvitError

    root = Path(images_root)
    conn.send(("ready", ""))
    while True:
        kind, data = conn.recv()
        try:
            if kind == "image":
                image = read_image(data)
                px = image.pixels
                if not (np.isfinite(px).all() and px.min() >= 0 and px.max() <= 1 and px.ndim == 2):
                    raise AssertionError("pixels outside [0, 1] or not finite")
            else:
                with tempfile.NamedTemporaryFile(suffix=".csv", dir=root.parent) as f:
                    f.write(data)
                    f.flush()
                    df = load_labels(f.name, root, check_files=False)
                if not all(Path(p).resolve().is_relative_to(root.resolve()) for p in df["path"]):
                    raise AssertionError("an image path escapes the image root")
            conn.send(("ok", ""))
        except MedvitError:
            conn.send(("refused", ""))
        except Exception as e:  # noqa: BLE001 - reporting these is the point
            frame = traceback.extract_tb(e.__traceback__)[-1]
            conn.send(("crash", f"{type(e).__name__} at {Path(frame.filename).name}:{frame.lineno}: {e}"[:300]))


class _Runner:
    """One worker process; restarted after a hang or a hard crash."""

    def __init__(self, images_root: Path) -> None:
        self.images_root = images_root
        self.ctx = mp.get_context("spawn")
        self._start()

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child, str(self.images_root)), daemon=True)
        self.proc.start()
        if not self.conn.poll(300):  # imports medvit, torch included
            raise RuntimeError("the fuzz worker did not start")
        self.conn.recv()

    def run(self, kind: str, data: bytes, timeout: float) -> tuple[str, str]:
        self.conn.send((kind, data))
        if self.conn.poll(timeout):
            try:
                return self.conn.recv()
            except EOFError:  # the worker died mid-input (a segfault in a decoder)
                pass
        status = "hang" if self.proc.is_alive() else f"worker died (exit {self.proc.exitcode})"
        self.proc.kill()
        self.proc.join()
        self._start()
        return "crash", status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300, help="how long to fuzz (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10, help="seconds per input before it counts as a hang")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "fuzz", help="crashing inputs")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    pool = seeds()
    names = sorted(pool)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        root.mkdir()
        for i in range(2):
            (root / f"img{i}.png").write_bytes(pool["png"])
        runner = _Runner(root)
        tried, outcomes, crashes = Counter(), Counter(), {}
        start = time.monotonic()
        while time.monotonic() - start < args.seconds:
            name = names[int(rng.integers(0, len(names)))]
            if name.startswith("csv"):
                kind, data = "labels", mutate_csv(pool[name], rng)
            else:
                kind, data = "image", mutate(pool[name], rng, header=1600 if name.startswith("dicom") else 120)
            status, detail = runner.run(kind, data, args.timeout)
            tried[name] += 1
            outcomes[status] += 1
            if status == "crash":
                signature = detail.split(": ", 1)[0]
                if signature not in crashes:
                    args.out.mkdir(parents=True, exist_ok=True)
                    path = args.out / f"crash_{len(crashes):03d}_{name}.bin"
                    path.write_bytes(data)
                    crashes[signature] = (detail, path)
                    print(f"crash: {detail} (input saved to {path})", flush=True)
        runner.proc.kill()
    seconds = time.monotonic() - start
    total = sum(tried.values())
    print(f"fuzz: tried {total} inputs in {seconds:.0f} s ({total / seconds:.1f}/s): "
          + ", ".join(f"{k} {v}" for k, v in sorted(tried.items())))  # fmt: skip
    print(f"outcomes: {outcomes['ok']} read, {outcomes['refused']} refused with a MedvitError, "
          f"{outcomes['crash']} crashes ({len(crashes)} distinct)")  # fmt: skip
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
