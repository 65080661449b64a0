"""Prefect tasks: thin adapters over prolong.pipeline (logs, progress and artifacts in the UI)."""
