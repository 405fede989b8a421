"""Prefect flows: each runs notebooks through the runner and records what they made.

Import the flows from their modules (``pipeline.flows.observations``); this package
imports nothing so that ``import pipeline.flows`` stays cheap.
"""
