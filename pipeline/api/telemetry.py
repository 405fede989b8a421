"""Prometheus metrics of the API: its requests, and the flow runs the catalogue holds."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pipeline.store import Catalogue
from pipeline.workflow.monitoring import MonitoringCollector

__all__ = ["Telemetry"]


class Telemetry:
    """One registry per application (several apps in one process stay apart)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "astr_api_requests",
            "HTTP requests answered, by method, route and status code.",
            ("method", "route", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "astr_api_request_seconds",
            "Time to answer a request, by route.",
            ("route",),
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )

    def watch(self, catalogue: Catalogue) -> None:
        """Also export the catalogue's flow runs and alerts, read at each scrape."""
        self.registry.register(MonitoringCollector(catalogue))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of everything registered."""
        return generate_latest(self.registry)
