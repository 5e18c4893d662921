"""The `medvit review` server process: Streamlit's own command line, plus a thread that loads the model at once.

Streamlit imports a page's modules and fills its st.cache_resource values on the first page run, so the first
reader used to wait for torch, timm and the model after the browser connected (issue 13). Here a background thread
of the server process does that work while Streamlit starts: it imports `medvit.review.app` and calls the page's
own cached `get_store` and `get_service` with the settings the page will read (`AppSettings.from_env`). The first
session then finds them loaded, or waits on Streamlit's per-value lock for the load already under way; the cache is
process-wide, so there is one model either way. Nothing is drawn: in site mode the page still asks for sign-in
before it shows anything about the model or a patient.

    python -m medvit.review.launch run PAGE [streamlit flags]   (what `medvit review` starts)
"""

from __future__ import annotations

import logging
import sys
import threading
import time

_log = logging.getLogger("medvit.review.launch")
WARM_UP_THREAD = "medvit-warm-up"


def warm_up() -> None:
    """Import the page's module and load its review store and service into Streamlit's resource cache.

    A failure is only logged: the first page run tries again and shows the problem in one line.
    """
    t0 = time.perf_counter()
    try:
        from medvit.review import app
        from medvit.review.settings import AppSettings

        settings = AppSettings.from_env()
        app.get_store(settings.db_url)
        service = app.get_service(settings.run_dir)
    except Exception as e:  # noqa: BLE001 - the page reports it to the reader; the server must keep running
        _log.warning("warm-up failed (the first page run will try again): %s", e)
        return
    model, seconds = service.predictor.info.model_name, time.perf_counter() - t0
    _log.info("warm-up: model %s loaded in the server process in %.1f s", model, seconds)


def main() -> None:
    """Start the warm-up thread, then run Streamlit's CLI with this process's arguments (`run PAGE ...`)."""
    handler = logging.StreamHandler()  # the server log says when the model is ready, whatever Streamlit configures
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _log.addHandler(handler)
    _log.setLevel(logging.INFO)
    # the cached functions' spinners find no page to draw on in this thread, which Streamlit warns about: expected
    logging.getLogger("streamlit.runtime.scriptrunner_utils.script_run_context").addFilter(
        lambda record: record.threadName != WARM_UP_THREAD
    )
    threading.Thread(target=warm_up, name=WARM_UP_THREAD, daemon=True).start()
    from streamlit.web.cli import main as streamlit_main

    sys.argv = ["streamlit", *sys.argv[1:]]
    streamlit_main(prog_name="streamlit")


if __name__ == "__main__":
    main()
