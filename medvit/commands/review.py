"""`medvit review`: start the Streamlit review app (apps/review.py) on this machine.

Settings reach the app through environment variables (`medvit.review.settings`: written by `AppSettings.to_env`,
read by `AppSettings.from_env`), so `streamlit run apps/review.py` and the AppTest harness see exactly the same
configuration. The server binds to localhost unless --host says otherwise: the app shows patient images.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
from pathlib import Path

from medvit.errors import ConfigError

_log = logging.getLogger(__name__)


def app_path() -> Path:
    """The page script inside the installed package, so a wheel serves the same app as a checkout."""
    from medvit.resources import APP_SCRIPT

    return APP_SCRIPT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from medvit.review.settings import DEFAULT_MAX_UPLOAD_MB

    parser.add_argument("--run", help="run folder to serve (default: $MEDVIT_RUN, else the packaged demo model)")
    parser.add_argument("--worklist", help="folder of DICOM/PNG/JPEG files to list in the app")
    parser.add_argument("--file", help="image to open at start (default: RG1_UNCI.dcm from pydicom-data)")
    parser.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    parser.add_argument("--host", default="localhost", help="address to bind (default localhost; 0.0.0.0 exposes it)")
    parser.add_argument("--db", help="review database URL (default: $MEDVIT_DB_URL, else SQLite in the user data dir)")
    parser.add_argument(
        "--max-upload-mb", type=int, default=DEFAULT_MAX_UPLOAD_MB, help="largest upload accepted, in MB"
    )


def _existing(args: argparse.Namespace, flag: str, *, is_dir: bool) -> Path | None:
    """The absolute path a --run/--worklist/--file flag names (the app may start elsewhere), checked to exist."""
    value = getattr(args, flag)
    if value is None:
        return None
    path = Path(value).expanduser().resolve()
    if not (path.is_dir() if is_dir else path.is_file()):
        raise ConfigError(f"--{flag} {value}: {'folder' if is_dir else 'file'} not found")
    return path


def build_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The streamlit command line and the environment for the app; validated, not yet run."""
    from medvit.review.settings import AppSettings, app_environment

    script = app_path()
    if not script.is_file():
        raise ConfigError(f"{script} not found: the medvit install is incomplete; reinstall medvit")
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: not a TCP port")
    if args.max_upload_mb < 1:
        raise ConfigError("--max-upload-mb must be at least 1")
    run = _existing(args, "run", is_dir=True)
    settings = AppSettings(run_dir=str(run) if run else None, worklist=_existing(args, "worklist", is_dir=True),
                           default_file=_existing(args, "file", is_dir=False), max_upload_mb=args.max_upload_mb,
                           db_url=args.db or None)
    env = app_environment(settings)
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(script),
        "--server.address", args.host,
        "--server.port", str(args.port),
        "--server.maxUploadSize", str(args.max_upload_mb),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        "--client.showErrorDetails", "none",
        "--client.toolbarMode", "minimal",
    ]  # fmt: skip
    return cmd, env


def run(args: argparse.Namespace) -> int:
    cmd, env = build_command(args)
    if args.host not in ("localhost", "127.0.0.1", "::1"):
        _log.warning("binding to %s: the app will be reachable from other machines", args.host)
    print(f"medvit review: http://{args.host}:{args.port}  (Ctrl+C to stop)", flush=True)
    child = subprocess.Popen(cmd, env=env)
    # SIGTERM (a service manager, `kill`) must stop the Streamlit server too, not orphan it on the port
    previous = signal.signal(signal.SIGTERM, lambda *_: child.terminate())
    try:
        return child.wait()
    except KeyboardInterrupt:  # Ctrl+C reaches the child through the terminal's process group as well
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(child)


def _stop(child: subprocess.Popen) -> None:
    """Terminate the server if it still runs, and kill it if it has not exited within 20 s."""
    if child.poll() is None:
        child.terminate()
    try:
        child.wait(timeout=20)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
