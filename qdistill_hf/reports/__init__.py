"""Pseudo-report generation and the resumable, sharded per-study runner."""
