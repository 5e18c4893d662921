"""`medvit review`: start the Streamlit review app (`medvit.review.app`) on this machine.

Settings reach the app through environment variables (`medvit.review.settings`: written by `AppSettings.to_env`,
read by `AppSettings.from_env`), so `streamlit run apps/review.py` and the AppTest harness see exactly the same
configuration. The server binds to localhost unless --host says otherwise: the app shows patient images, so any
other address needs site mode (sign-in) and TLS, or the command refuses to start. The server runs through
`medvit.review.launch`, which loads the model in the server process while Streamlit starts (cold start, issue 13).
"""

from __future__ import annotations

import argparse
import ipaddress
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
    parser.add_argument(
        "--host", "--address", dest="host", default="localhost",
        help="address to bind (default localhost); any other needs --auth accounts and --tls-cert/--tls-key",
    )  # fmt: skip
    parser.add_argument(
        "--auth", choices=["local", "accounts"],
        help="local: no sign-in (default: $MEDVIT_AUTH, else local); accounts: site mode, see `medvit users`",
    )  # fmt: skip
    parser.add_argument("--tls-cert", help="PEM certificate to serve HTTPS with (Streamlit's server.sslCertFile)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert (Streamlit's server.sslKeyFile)")
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
        raise ConfigError(f"--{flag.replace('_', '-')} {value}: {'folder' if is_dir else 'file'} not found")
    return path


def is_loopback(host: str) -> bool:
    """Whether binding to `host` keeps the app on this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve to anything
        return False


def _tls_files(args: argparse.Namespace) -> list[str]:
    """Streamlit's HTTPS flags for --tls-cert/--tls-key, after checking that the pair loads."""
    if args.tls_cert is None and args.tls_key is None:
        return []
    if args.tls_cert is None or args.tls_key is None:
        raise ConfigError("--tls-cert and --tls-key go together: give the certificate and its private key")
    cert, key = _existing(args, "tls_cert", is_dir=False), _existing(args, "tls_key", is_dir=False)
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key), password="")
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(
            f"--tls-cert {args.tls_cert} / --tls-key {args.tls_key}: not a PEM certificate and its matching "
            f"private key ({getattr(e, 'reason', None) or e})"
        ) from None
    return ["--server.sslCertFile", str(cert), "--server.sslKeyFile", str(key)]


def _check_exposure(host: str, auth: str, tls: list[str]) -> None:
    """Refuse to serve beyond this machine without sign-in and TLS: the app shows patient images and passwords."""
    if is_loopback(host):
        return
    missing = [need for need, ok in (("site mode (--auth accounts or MEDVIT_AUTH=accounts)", auth == "accounts"),
                                     ("TLS (--tls-cert and --tls-key)", bool(tls))) if not ok]  # fmt: skip
    if missing:
        raise ConfigError(
            f"refusing to serve on {host}: beyond localhost the app needs {' and '.join(missing)}, because it "
            "shows patient images and takes passwords"
        )


def build_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The server's command line (Streamlit's `run`, through the warm-up launcher) and the environment for the app;
    validated, not yet run."""
    from medvit.review.settings import AppSettings, app_environment, auth_mode, idle_minutes

    script = app_path()
    if not script.is_file():
        raise ConfigError(f"{script} not found: the medvit install is incomplete; reinstall medvit")
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: not a TCP port")
    if args.max_upload_mb < 1:
        raise ConfigError("--max-upload-mb must be at least 1")
    auth = args.auth or auth_mode()
    tls = _tls_files(args)
    _check_exposure(args.host, auth, tls)
    run = _existing(args, "run", is_dir=True)
    settings = AppSettings(run_dir=str(run) if run else None, worklist=_existing(args, "worklist", is_dir=True),
                           default_file=_existing(args, "file", is_dir=False), max_upload_mb=args.max_upload_mb,
                           db_url=args.db or None, auth=auth, idle_minutes=idle_minutes())  # fmt: skip
    env = app_environment(settings)
    cmd = [
        sys.executable, "-m", "medvit.review.launch", "run", str(script),
        "--server.address", args.host,
        "--server.port", str(args.port),
        "--server.maxUploadSize", str(args.max_upload_mb),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        "--client.showErrorDetails", "none",
        "--client.toolbarMode", "minimal",
        *tls,
    ]  # fmt: skip
    return cmd, env


def run(args: argparse.Namespace) -> int:
    cmd, env = build_command(args)
    if not is_loopback(args.host):
        _log.warning("binding to %s: the app will be reachable from other machines", args.host)
    scheme = "https" if "--server.sslCertFile" in cmd else "http"
    print(f"medvit review: {scheme}://{args.host}:{args.port}  (Ctrl+C to stop)", flush=True)
    child = subprocess.Popen(cmd, env=env)
    # SIGTERM (a service manager, `kill`) must stop the Streamlit server too, not orphan it on the port: leave the
    # wait, so that `_stop` terminates the child and kills it after 20 s (a server still importing torch in its
    # warm-up thread was seen to outlive SIGTERM for over 30 s, after which a supervisor kills this process)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return child.wait()
    except KeyboardInterrupt:  # Ctrl+C reaches the child through the terminal's process group as well
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(child)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _stop(child: subprocess.Popen) -> None:
    """Terminate the server if it still runs, and kill it if it has not exited within 20 s."""
    if child.poll() is None:
        child.terminate()
    try:
        child.wait(timeout=20)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
