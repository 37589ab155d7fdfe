"""Trace readers: one module per trace format, each yielding raw rows with their line numbers."""
