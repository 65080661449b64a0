"""Evaluation: HELMET-style long-context tasks and lm-eval short-context tasks (runs as a job)."""
