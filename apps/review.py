"""The review app for `streamlit run apps/review.py` in a source checkout; the page lives in medvit.review.app."""

from medvit.review.app import run

run()
