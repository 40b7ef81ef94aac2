"""The review dashboard: ``bias-audit dashboard --store DIR [--port P]``.

Pages read the run store; only the Decisions page writes, to the append-only
``decisions.jsonl``.
"""

from pathlib import Path

import streamlit as st

HERE = Path(__file__).parent

st.set_page_config(page_title="Bias audit review", layout="wide")
pages = [
    st.Page(HERE / "views" / "runs.py", title="Runs", url_path="runs", default=True),
    st.Page(HERE / "views" / "classes.py", title="Classes", url_path="classes"),
    st.Page(HERE / "views" / "class_detail.py", title="Class detail", url_path="class_detail"),
    st.Page(HERE / "views" / "compare.py", title="Compare", url_path="compare"),
    st.Page(HERE / "views" / "decisions.py", title="Decisions", url_path="decisions"),
]
st.navigation(pages).run()
