"""Live Streamlit dashboard over the Parquet lake, read through DuckDB."""
