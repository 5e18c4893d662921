"""Cold start of the review app: `medvit review` process start -> first findings row visible in a browser (issue 13).

Each repeat starts a new `medvit review` on a free localhost port, as `make review` does (the embedded demo model,
opened on RG1_UNCI.dcm; a temporary SQLite review database), and opens it in headless Chromium (Debian's
/usr/bin/chromium through Playwright, launched before the clock starts, as a reader's browser already runs). The
page is opened as soon as Streamlit's health endpoint answers, like a reader who clicks the printed URL at once.
Reported per repeat, from `Popen`:

- **health**: first HTTP 200 from `/_stcore/health` (the server listens);
- **page**: the page's title drawn (the page script started);
- **first row**: the first findings row visible (what the issue's "< 10 s" is about).

A cold start has no baseline that can run in the same process, so each run records the machine (CPU model, ISA
flags from `medvit._platform`) and the 1-minute load average before and after every repeat; compare runs only
with their load beside them. Medians over the repeats are printed last.

    python benchmarks/cold_start.py [--repeats 5] [--timeout 180] [--json out.json] [-- EXTRA medvit review ARGS]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("MEDVIT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
ROW = '[class*="st-key-frow_"]'  # a findings row's container (keyed frow_<i>_<image>)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def one_start(browser: Any, extra: list[str], timeout_s: float, workdir: Path) -> dict[str, float]:
    """One cold start: seconds from Popen to health, page title and first findings row."""
    port = _free_port()
    url = f"http://localhost:{port}"
    db = f"sqlite:///{workdir / f'reviews_{port}.sqlite3'}"
    log = (workdir / f"server_{port}.log").open("w")
    cmd = [sys.executable, "-m", "medvit", "review", "--port", str(port), "--db", db, *extra]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        while not _healthy(url):
            if proc.poll() is not None:
                raise SystemExit(f"medvit review exited with {proc.returncode}; see {log.name} in {workdir}")
            if time.perf_counter() - t0 > timeout_s:
                raise SystemExit(f"medvit review not healthy within {timeout_s:.0f} s")
            time.sleep(0.05)
        health = time.perf_counter() - t0
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(url)
        page.get_by_role("heading", name="Chest X-ray review").wait_for(timeout=timeout_s * 1e3)
        title = time.perf_counter() - t0
        page.locator(ROW).first.wait_for(state="visible", timeout=timeout_s * 1e3)
        first_row = time.perf_counter() - t0
        page.close()
    finally:
        proc.terminate()  # `medvit review` stops its Streamlit child on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    return {"health_s": health, "page_s": title, "first_row_s": first_row, "load_before": load_before,
            "load_after": os.getloadavg()[0]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="cold starts (default 5)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds allowed per step (default 180)")
    parser.add_argument("--json", type=Path, help="also write the per-repeat results here")
    parser.add_argument("extra", nargs="*", help="more `medvit review` arguments (after --)")
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).is_file():
        parser.error(f"{CHROMIUM} not found: `apt-get install -y chromium` (or set MEDVIT_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    from medvit._platform import cpu_model, isa_flags

    flags = sorted(isa_flags() & {"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                                  "amx_int8"})  # fmt: skip
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, ISA {' '.join(flags) or '(no x86 SIMD flags)'}")
    print(f"command: medvit review --port P --db sqlite:///tmp {' '.join(args.extra)}".rstrip())
    results = []
    with tempfile.TemporaryDirectory(prefix="medvit-coldstart-") as tmp, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for i in range(args.repeats):
                r = one_start(browser, args.extra, args.timeout, Path(tmp))
                results.append(r)
                print(
                    f"repeat {i + 1}: health {r['health_s']:5.1f} s  page {r['page_s']:5.1f} s  first row "
                    f"{r['first_row_s']:5.1f} s  (load {r['load_before']:.2f} -> {r['load_after']:.2f})",
                    flush=True,
                )
        finally:
            browser.close()
    med = {k: statistics.median(r[k] for r in results) for k in ("health_s", "page_s", "first_row_s")}
    loads = [r[k] for r in results for k in ("load_before", "load_after")]
    print(
        f"median of {len(results)}: health {med['health_s']:.1f} s, page {med['page_s']:.1f} s, first findings row "
        f"{med['first_row_s']:.1f} s (target < 10 s); load average {min(loads):.2f}-{max(loads):.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps({"machine": cpu_model(), "isa": flags, "repeats": results, "median": med},
                                        indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
