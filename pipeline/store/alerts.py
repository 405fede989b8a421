"""Catalogue queries of the alerting: alerts, their deliveries and stored routes.

The decisions (deduplicate, throttle, escalate) are ``pipeline.workflow.alerting``'s;
this module reads and writes the rows, inside one transaction per decision so that
flow processes failing at the same moment agree on what was already sent.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from pipeline.errors import NotFoundError
from pipeline.store.catalogue import Catalogue, as_uuid
from pipeline.store.models import Alert, AlertDelivery, AlertRoute, utcnow

__all__ = [
    "ACKNOWLEDGED",
    "OPEN",
    "AlertStore",
]

OPEN = "open"
ACKNOWLEDGED = "acknowledged"


class AlertStore:
    """Alerts, deliveries and stored routes in the catalogue database.

    Parameters
    ----------
    catalogue : Catalogue
        An open catalogue (its schema holds the alert tables).
    """

    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue

    # -- routes ---------------------------------------------------------------------

    def save_route(self, name: str, config: Mapping[str, Any]) -> None:
        """Store a route under ``name``, replacing one of the same name."""
        with self.catalogue.session() as session:
            route = session.get(AlertRoute, name)
            if route is None:
                session.add(AlertRoute(name=name, config=dict(config)))
            else:
                route.config = dict(config)

    def delete_route(self, name: str) -> bool:
        """Forget a stored route; False when there was none of that name."""
        with self.catalogue.session() as session:
            route = session.get(AlertRoute, name)
            if route is None:
                return False
            session.delete(route)
            return True

    def routes(self) -> list[dict[str, Any]]:
        """Stored routes in the order they were created, each with its ``name``."""
        query = select(AlertRoute).order_by(AlertRoute.created_at, AlertRoute.name)
        with self.catalogue.session() as session:
            return [{**route.config, "name": route.name} for route in session.scalars(query)]

    # -- alerts ---------------------------------------------------------------------

    @contextmanager
    def locked(self, flow_type: str, fingerprint: str) -> Iterator[Session]:
        """A transaction in which no other process decides on the same failure.

        SQLite's write transactions are serial already; PostgreSQL takes an advisory
        lock on the failure's key.
        """
        with self.catalogue.session() as session:
            if session.get_bind().dialect.name == "postgresql":
                digest = hashlib.sha256(f"{flow_type}:{fingerprint}".encode()).digest()
                key = int.from_bytes(digest[:8], "big", signed=True)
                session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
            yield session

    @staticmethod
    def active_alert(
        session: Session, flow_type: str, fingerprint: str, seen_since: datetime
    ) -> Alert | None:
        """The newest open or acknowledged alert of this failure seen since ``seen_since``."""
        query = (
            select(Alert)
            .where(
                Alert.flow_type == flow_type,
                Alert.fingerprint == fingerprint,
                Alert.status.in_((OPEN, ACKNOWLEDGED)),
                Alert.last_seen >= seen_since,
            )
            .order_by(Alert.last_seen.desc())
        )
        return session.scalars(query.limit(1)).first()

    @staticmethod
    def deliveries_since(session: Session, route: str, since: datetime) -> int:
        """Notifications to ``route`` since ``since`` that were not throttled."""
        query = select(func.count()).where(
            AlertDelivery.route == route,
            AlertDelivery.created_at >= since,
            AlertDelivery.status != "throttled",
        )
        return int(session.scalar(query) or 0)

    def set_delivery(self, delivery_id: int, status: str, channels: Mapping[str, str]) -> None:
        """Record how a pending delivery went."""
        with self.catalogue.session() as session:
            delivery = session.get(AlertDelivery, delivery_id)
            if delivery is None:
                raise NotFoundError(f"no alert delivery {delivery_id} in the catalogue")
            delivery.status = status
            delivery.channels = dict(channels)
            if status == "sent":
                alert = session.get(Alert, delivery.alert_id)
                if alert is not None:
                    alert.notified_at = utcnow()

    def overdue_candidates(self) -> list[Alert]:
        """Open (unacknowledged) alerts, oldest first: the ones an ack timeout can move."""
        query = select(Alert).where(Alert.status == OPEN).order_by(Alert.first_seen)
        with self.catalogue.session() as session:
            return list(session.scalars(query))

    def get(self, alert_id: uuid.UUID | str) -> Alert:
        """One alert; NotFoundError names the id when there is none."""
        with self.catalogue.session() as session:
            return _alert(session, alert_id)

    def acknowledge(self, alert_id: uuid.UUID | str, by: str | None = None) -> Alert:
        """Mark an alert acknowledged (once: a second call keeps the first time)."""
        with self.catalogue.session() as session:
            alert = _alert(session, alert_id)
            if alert.status == OPEN:
                alert.status = ACKNOWLEDGED
                alert.acknowledged_at = utcnow()
                alert.acknowledged_by = by
            return alert

    def recent(
        self, *, status: str | None = None, since: datetime | None = None, limit: int = 100
    ) -> list[Alert]:
        """Alerts, most recently seen first."""
        query = select(Alert).order_by(Alert.last_seen.desc())
        if status is not None:
            query = query.where(Alert.status == status)
        if since is not None:
            query = query.where(Alert.last_seen >= since)
        with self.catalogue.session() as session:
            return list(session.scalars(query.limit(limit)))

    def deliveries(self, alert_id: uuid.UUID | str) -> list[AlertDelivery]:
        """An alert's deliveries in the order they were made."""
        query = (
            select(AlertDelivery)
            .where(AlertDelivery.alert_id == as_uuid(alert_id))
            .order_by(AlertDelivery.id)
        )
        with self.catalogue.session() as session:
            return list(session.scalars(query))

    def summary(self) -> dict[str, Any]:
        """Open alerts per (flow type, severity, level) and deliveries per (route, status)."""
        with self.catalogue.session() as session:
            open_alerts = session.execute(
                select(Alert.flow_type, Alert.severity, Alert.level, func.count())
                .where(Alert.status == OPEN)
                .group_by(Alert.flow_type, Alert.severity, Alert.level)
            ).all()
            deliveries = session.execute(
                select(AlertDelivery.route, AlertDelivery.status, func.count()).group_by(
                    AlertDelivery.route, AlertDelivery.status
                )
            ).all()
        return {
            "open": [tuple(row) for row in open_alerts],
            "deliveries": [tuple(row) for row in deliveries],
        }


def _alert(session: Session, alert_id: uuid.UUID | str) -> Alert:
    alert = session.get(Alert, as_uuid(alert_id))
    if alert is None:
        raise NotFoundError(f"no alert {alert_id} in the catalogue: see `astr alerts list`")
    return alert
