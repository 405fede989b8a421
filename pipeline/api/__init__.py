"""REST API of the pipeline: the ``/workflows`` routes, ``/health`` and ``/metrics``."""

from pipeline.api.app import create_app

__all__ = ["create_app"]
