"""Streamlit glue: the only part of vlcore that imports streamlit."""
