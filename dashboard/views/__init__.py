"""Dashboard pages: Streamlit scripts that st.navigation runs (not a legacy pages/ folder)."""
