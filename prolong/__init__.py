"""ProLong: long-context continued training as a resumable, orchestrated recipe.

This package is the library: it imports no orchestration framework. `flows/` and `tasks/` adapt it
to Prefect; training and evaluation run as separate processes (`python -m prolong.jobs.entry`).
"""

__version__ = "0.2.0"
