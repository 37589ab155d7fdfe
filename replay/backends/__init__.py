"""Replay backends: one class per backend (twin in-process, vLLM over HTTP)."""
