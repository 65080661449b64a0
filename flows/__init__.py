"""Prefect flows of the ProLong recipe service."""
