"""Data: webdataset pipeline and the built-in synthetic dataset (no Lightning here)."""
