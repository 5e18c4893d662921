"""The Streamlit page script `medvit review` runs; the page itself is `medvit.review.app`.

A thin script, so that the app is an imported module (`medvit.review.app`) rather than `__main__`: its
st.cache_resource functions then have the same cache key in the page runs as in the server's warm-up thread
(`medvit.review.launch`), which loads the model before the first session. A reader who opens a server in its first
seconds sees what it is waiting for (the import waits for the warm-up's); the spinner shows only after 0.5 s.
"""

import streamlit as st

with st.spinner("Starting medvit review: loading torch and the model (once per server)…"):
    from medvit.review.app import run

run()
