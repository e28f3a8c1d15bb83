"""Dagster definitions by domain: ingest, compliance, metrics, health, validation.

``resources`` is injected everywhere; ``automation`` holds the policies that apply to
every asset. :mod:`horizons_platform.definitions` assembles them into the code location.
"""
