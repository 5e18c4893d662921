"""The Streamlit page script `medvit review` runs; the page itself is `medvit.review.app`.

A thin script, so that the app is an imported module (`medvit.review.app`) rather than `__main__`: its
st.cache_resource functions then have the same cache key in the page runs as in the server's warm-up thread
(`medvit.review.launch`), which loads the model before the first session.
"""

from medvit.review.app import run

run()
