"""The Streamlit review dashboard (reads the run store; never recomputes an audit)."""
