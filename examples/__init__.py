"""Runnable examples (importable, so that tests can import them)."""
