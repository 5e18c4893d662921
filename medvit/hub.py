"""The one offline switch for every command, and a sub-second check that the Hugging Face hub answers.

`medvit --offline COMMAND` or MEDVIT_OFFLINE=1 sets HF_HUB_OFFLINE and friends before any hub library is
imported (huggingface_hub reads them once, at import). Without it, a loader that would download asks
`hub_reachable()` first: huggingface_hub retries a dead connection for about a minute ("Retrying in 8s"),
while this probe answers in at most `PROBE_TIMEOUT_S`, so a machine without network gets the loader's clear
error at once and loads from the local cache instead. This module imports no torch and no hub library.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from functools import cache
from urllib.error import HTTPError
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

_log = logging.getLogger(__name__)

OFFLINE_ENV = "MEDVIT_OFFLINE"
# huggingface_hub, transformers and datasets each read their own variable.
HUB_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
PROBE_TIMEOUT_S = 0.8
_TRUE = ("1", "true", "yes", "on")


def offline_requested(offline: bool | None = None) -> bool:
    """The explicit flag, else MEDVIT_OFFLINE / HF_HUB_OFFLINE from the environment."""
    if offline is not None:
        return offline
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in (OFFLINE_ENV, "HF_HUB_OFFLINE"))


def set_offline_env() -> None:
    """Tell huggingface_hub, transformers and datasets not to touch the network (read at their import)."""
    os.environ[OFFLINE_ENV] = "1"
    for var in HUB_OFFLINE_VARS:
        os.environ[var] = "1"
    if "huggingface_hub" in sys.modules:
        _log.debug("huggingface_hub was imported before offline mode was set: loaders pass local_files_only")


def hub_endpoint() -> str:
    """The hub the libraries talk to ($HF_ENDPOINT, else huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


@cache
def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub answers an HTTP request within `timeout` seconds (any status counts; proxies are honoured).

    Runs in a daemon thread so that a stalled DNS lookup cannot hold the caller past the timeout.
    Cached per process: one probe, however many loaders ask.
    """
    answered: list[bool] = []

    def probe() -> None:
        try:
            with urlopen(Request(hub_endpoint(), method="HEAD"), timeout=timeout):
                pass
            answered.append(True)
        except HTTPError:  # the server answered, with an error status: it is reachable
            answered.append(True)
        except (OSError, ValueError) as e:  # URLError (DNS, refused, TLS) and timeouts are OSErrors
            _log.debug("hub probe of %s failed: %s", hub_endpoint(), e)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout + 0.2)
    if not answered:
        _log.info("the Hugging Face hub (%s) did not answer within %.1f s: using local files only",
                  urlsplit(hub_endpoint()).netloc, timeout)
    return bool(answered)


def use_local_files_only() -> bool:
    """True when a hub download must not be tried: offline mode is on, or the hub does not answer."""
    return offline_requested() or not hub_reachable()


def unavailable_reason() -> str:
    """Why a hub download was not tried, for error messages."""
    if offline_requested():
        return f"offline mode is on (--offline / {OFFLINE_ENV} / HF_HUB_OFFLINE)"
    return f"the Hugging Face hub ({urlsplit(hub_endpoint()).netloc}) cannot be reached"
