"""Small helpers shared by the ``astr`` command modules."""

from __future__ import annotations

from typing import Any

__all__ = ["flatten"]


def flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dict -> ``[("a.b", value), ...]`` rows for a two-column table."""
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(flatten(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows
