"""The observation catalogue: observations, their products, candidates and flow runs."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, delete, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import WorkflowConfig
from pipeline.errors import CatalogueError, NotFoundError
from pipeline.store import migrate
from pipeline.store.db import make_engine
from pipeline.store.models import Candidate, FlowRun, Observation, Product, utcnow
from pipeline.types import FlowState, FlowType, ObservationStatus

__all__ = ["CANDIDATE_COLUMNS", "Catalogue", "as_uuid", "unreachable_message"]

CANDIDATE_COLUMNS = ("x", "y", "ra", "dec", "flux", "flux_err", "snr", "flags", "rb_score")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FLOW_RUN_FIELDS = frozenset(
    {
        "status",
        "metrics",
        "progress",
        "current_step",
        "error_message",
        "attempts",
        "started_at",
        "ended_at",
        "observation_id",
        "parameters",
    }
)


class Catalogue:
    """Repository over the catalogue database; the schema is migrated on first use.

    Records come back detached from their session, readable after the call returns.

    Parameters
    ----------
    database_url : str
        SQLAlchemy URL (SQLite by default, PostgreSQL by configuration).
    migrate_schema : bool
        Bring the schema to the newest revision when opening (default True).
    """

    def __init__(self, database_url: str, *, migrate_schema: bool = True) -> None:
        self.database_url = database_url
        self.engine: Engine = make_engine(database_url)
        if migrate_schema:
            with self._reachable():
                migrate.upgrade(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def from_config(cls, config: WorkflowConfig) -> Catalogue:
        """Open the catalogue at ``config.database_url``."""
        return cls(config.database_url)

    def close(self) -> None:
        """Release every pooled connection."""
        self.engine.dispose()

    def __enter__(self) -> Catalogue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on any error.

        Raises
        ------
        CatalogueError
            When a database server (PostgreSQL) cannot be reached or drops the
            connection; the message names the database with its password masked.
            Pooled connections are checked before use, so the next session after the
            server is back works without reopening the catalogue.
        """
        with self._reachable(), self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        """Turn a lost or refused server connection into a CatalogueError that says so."""
        try:
            yield
        except (OperationalError, InterfaceError) as exc:
            if self.engine.dialect.name == "sqlite":
                raise  # a file, not a server: "database is locked" and such keep their type
            raise CatalogueError(unreachable_message(self.database_url, exc)) from exc

    # -- observations ---------------------------------------------------------------

    def add_observation(
        self,
        *,
        raw_checksums: Mapping[str, str],
        metadata: Mapping[str, Any] | None = None,
        band: str | None = None,
        mjd: float | None = None,
        status: ObservationStatus = ObservationStatus.REGISTERED,
        observation_id: uuid.UUID | None = None,
        input_key: str | None = None,
    ) -> Observation:
        """Register an observation.

        Parameters
        ----------
        raw_checksums : mapping
            sha256 of each raw input by role (``{"science": ..., "reference": ...}``).
        metadata : mapping, optional
            JSON-serialisable facts (instrument, paths given, header values).
        band : str, optional
        mjd : float, optional
        status : ObservationStatus
        observation_id : UUID, optional
            Default: a new random UUID.
        input_key : str, optional
            Hash of the inputs; at most one observation has a given key.

        Returns
        -------
        Observation
        """
        for role, digest in raw_checksums.items():
            _check_sha256(f"raw_checksums[{role!r}]", digest)
        observation = Observation(
            id=observation_id or uuid.uuid4(),
            status=ObservationStatus(status).value,
            raw_checksums=dict(raw_checksums),
            meta=dict(metadata or {}),
            band=band,
            mjd=_finite_or_none(mjd),
            input_key=input_key,
            steps={},
        )
        with self.session() as session:
            session.add(observation)
            try:
                session.flush()
            except IntegrityError:
                what = f" or one with input key {input_key}" if input_key else ""
                raise CatalogueError(
                    f"observation {observation.id} already exists in the catalogue{what}"
                ) from None
        return observation

    def find_observation(self, input_key: str) -> Observation | None:
        """The observation registered with ``input_key``, if any."""
        with self.session() as session:
            return session.scalars(
                select(Observation).where(Observation.input_key == input_key)
            ).first()

    def set_step_state(
        self,
        observation_id: uuid.UUID | str,
        step: str,
        state: Mapping[str, Any],
        *,
        status: ObservationStatus | None = None,
        error_message: str | None = None,
    ) -> Observation:
        """Record how one pipeline step of an observation went, and optionally its status.

        Parameters
        ----------
        observation_id : UUID or str
        step : str
            Step name (``ingestion``, ``preprocessing``...).
        state : mapping
            JSON-serialisable facts (``status``, ``run_id``, ``error``...); replaces the
            step's earlier state.
        status : ObservationStatus, optional
            New observation status.
        error_message : str, optional
            Stored with the status (cleared when None).
        """
        with self.session() as session:
            observation = self._observation(session, observation_id)
            observation.steps = {**(observation.steps or {}), step: dict(state)}
            if status is not None:
                observation.status = ObservationStatus(status).value
                observation.error_message = error_message
            observation.updated_at = utcnow()
            return observation

    def get_observation(self, observation_id: uuid.UUID | str) -> Observation:
        """Return one observation; NotFoundError names the id if it is unknown."""
        with self.session() as session:
            return self._observation(session, observation_id)

    def list_observations(
        self,
        *,
        status: ObservationStatus | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Observation]:
        """Observations, newest first, optionally of one status."""
        query = select(Observation).order_by(Observation.created_at.desc(), Observation.id)
        if status is not None:
            query = query.where(Observation.status == ObservationStatus(status).value)
        with self.session() as session:
            return list(session.scalars(query.limit(limit).offset(offset)))

    def set_observation_status(
        self,
        observation_id: uuid.UUID | str,
        status: ObservationStatus,
        *,
        error_message: str | None = None,
    ) -> Observation:
        """Move an observation to ``status`` (recording why when it failed)."""
        with self.session() as session:
            observation = self._observation(session, observation_id)
            observation.status = ObservationStatus(status).value
            observation.error_message = error_message
            observation.updated_at = utcnow()
            return observation

    def delete_observation(self, observation_id: uuid.UUID | str) -> None:
        """Remove an observation with its product records and candidates.

        Stored objects are not touched: the catalogue only forgets them.
        """
        with self.session() as session:
            session.delete(self._observation(session, observation_id))

    # -- products -------------------------------------------------------------------

    def add_product(
        self,
        observation_id: uuid.UUID | str,
        *,
        kind: str,
        uri: str,
        sha256: str,
        size_bytes: int,
        step: str,
        run_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Product:
        """Record a stored artifact of an observation.

        Raises
        ------
        CatalogueError
            If the URI is already recorded or an argument is malformed.
        NotFoundError
            If the observation does not exist.
        """
        if not kind or not step:
            raise CatalogueError(f"product of {observation_id}: kind and step must be non-empty")
        _check_sha256(f"product {kind!r} sha256", sha256)
        if size_bytes < 0:
            raise CatalogueError(f"product {kind!r}: size_bytes must be >= 0, got {size_bytes}")
        with self.session() as session:
            observation = self._observation(session, observation_id)
            product = Product(
                observation_id=observation.id,
                kind=kind,
                uri=uri,
                sha256=sha256,
                size_bytes=size_bytes,
                step=step,
                run_id=run_id,
                meta=dict(metadata or {}),
            )
            session.add(product)
            try:
                session.flush()
            except IntegrityError:
                raise CatalogueError(f"a product is already recorded at {uri}") from None
            return product

    def products(
        self,
        observation_id: uuid.UUID | str,
        *,
        kind: str | None = None,
        step: str | None = None,
    ) -> list[Product]:
        """An observation's products, oldest first, filtered by kind and/or step."""
        query = select(Product).where(Product.observation_id == as_uuid(observation_id))
        if kind is not None:
            query = query.where(Product.kind == kind)
        if step is not None:
            query = query.where(Product.step == step)
        with self.session() as session:
            self._observation(session, observation_id)
            return list(session.scalars(query.order_by(Product.created_at, Product.id)))

    def latest_product(self, observation_id: uuid.UUID | str, kind: str) -> Product:
        """The newest product of one kind; NotFoundError names what is missing."""
        found = self.products(observation_id, kind=kind)
        if not found:
            raise NotFoundError(
                f"observation {observation_id} has no {kind!r} product: run the step "
                "that makes it first"
            )
        return found[-1]

    def delete_product(self, product_id: uuid.UUID | str) -> None:
        """Forget one product record (the stored object is not touched)."""
        with self.session() as session:
            product = session.get(Product, as_uuid(product_id))
            if product is None:
                raise NotFoundError(f"no product {product_id} in the catalogue")
            session.delete(product)

    # -- candidates -----------------------------------------------------------------

    def replace_candidates(
        self,
        observation_id: uuid.UUID | str,
        rows: Iterable[Mapping[str, Any]],
        *,
        run_id: str | None = None,
    ) -> int:
        """Store an observation's candidates, replacing any from an earlier run.

        Parameters
        ----------
        observation_id : UUID or str
        rows : iterable of mapping
            Each needs ``x`` and ``y`` (pixels); the columns in ``CANDIDATE_COLUMNS``
            are stored as such (NaN as NULL) and any other key in ``properties``.
        run_id : str, optional
            Run that produced them.

        Returns
        -------
        int
            Number of candidates stored.
        """
        candidates = [_candidate(i, row, run_id) for i, row in enumerate(rows)]
        with self.session() as session:
            observation = self._observation(session, observation_id)
            session.execute(delete(Candidate).where(Candidate.observation_id == observation.id))
            for candidate in candidates:
                candidate.observation_id = observation.id
            session.add_all(candidates)
        return len(candidates)

    def candidates(
        self, observation_id: uuid.UUID | str, *, min_snr: float | None = None
    ) -> list[Candidate]:
        """An observation's candidates in detection order."""
        query = select(Candidate).where(Candidate.observation_id == as_uuid(observation_id))
        if min_snr is not None:
            query = query.where(func.abs(Candidate.snr) >= min_snr)
        with self.session() as session:
            self._observation(session, observation_id)
            return list(session.scalars(query.order_by(Candidate.number)))

    def scores_between(self, since: datetime, until: datetime) -> list[tuple[float, str | None]]:
        """Real/bogus scores of candidates stored in [since, until), with their model.

        Returns
        -------
        list of (rb_score, model version or None)
            Unscored candidates (NULL rb_score) are left out.
        """
        query = select(Candidate.rb_score, Candidate.properties).where(
            Candidate.created_at >= since,
            Candidate.created_at < until,
            Candidate.rb_score.is_not(None),
        )
        with self.session() as session:
            return [
                (float(score), (props or {}).get("rb_model") or None)
                for score, props in session.execute(query)
            ]

    # -- flow runs ------------------------------------------------------------------

    def record_flow_run(
        self,
        flow_run_id: uuid.UUID | str,
        flow_type: FlowType,
        *,
        status: FlowState = FlowState.PENDING,
        parameters: Mapping[str, Any] | None = None,
        observation_id: uuid.UUID | str | None = None,
        parent_id: uuid.UUID | str | None = None,
    ) -> FlowRun:
        """Create the record of a flow run, or return the existing one unchanged."""
        with self.session() as session:
            existing = session.get(FlowRun, as_uuid(flow_run_id))
            if existing is not None:
                return existing
            run = FlowRun(
                id=as_uuid(flow_run_id),
                flow_type=FlowType(flow_type).value,
                status=FlowState(status).value,
                parameters=dict(parameters or {}),
                observation_id=as_uuid(observation_id) if observation_id else None,
                parent_id=as_uuid(parent_id) if parent_id else None,
            )
            session.add(run)
            return run

    def update_flow_run(self, flow_run_id: uuid.UUID | str, **changes: Any) -> FlowRun:
        """Change fields of a flow run record (status, progress, metrics, times...).

        ``metrics`` is merged into the stored metrics rather than replacing them.
        """
        unknown = set(changes) - _FLOW_RUN_FIELDS
        if unknown:
            raise CatalogueError(
                f"cannot update flow run field(s) {', '.join(sorted(unknown))}; "
                f"allowed: {', '.join(sorted(_FLOW_RUN_FIELDS))}"
            )
        with self.session() as session:
            run = session.get(FlowRun, as_uuid(flow_run_id))
            if run is None:
                raise NotFoundError(f"no flow run {flow_run_id} in the catalogue")
            for key, value in changes.items():
                if key == "status":
                    value = FlowState(value).value
                elif key == "metrics":
                    value = {**run.metrics, **value}
                elif key == "progress" and not 0.0 <= float(value) <= 1.0:
                    raise CatalogueError(f"flow run progress must be within 0-1, got {value}")
                elif key == "observation_id" and value is not None:
                    value = as_uuid(value)
                setattr(run, key, value)
            return run

    def get_flow_run(self, flow_run_id: uuid.UUID | str) -> FlowRun:
        """Return one flow run record; NotFoundError names the id if it is unknown."""
        with self.session() as session:
            run = session.get(FlowRun, as_uuid(flow_run_id))
            if run is None:
                raise NotFoundError(f"no flow run {flow_run_id} in the catalogue")
            return run

    def list_flow_runs(
        self,
        *,
        flow_type: FlowType | None = None,
        status: FlowState | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
        top_level: bool = False,
    ) -> list[FlowRun]:
        """Flow runs, newest first, filtered by type, status and creation time.

        ``top_level`` leaves out subflow runs (those with a parent run).
        """
        query = _flow_run_filter(
            select(FlowRun), flow_type, status, since, until, top_level=top_level
        ).order_by(FlowRun.created_at.desc(), FlowRun.id)
        with self.session() as session:
            return list(session.scalars(query.limit(limit).offset(offset)))

    def count_flow_runs(
        self,
        *,
        flow_type: FlowType | None = None,
        status: FlowState | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        top_level: bool = False,
    ) -> int:
        """How many flow runs :meth:`list_flow_runs` would find without a limit."""
        query = _flow_run_filter(
            select(func.count()).select_from(FlowRun),
            flow_type,
            status,
            since,
            until,
            top_level=top_level,
        )
        with self.session() as session:
            return int(session.scalar(query) or 0)

    def child_flow_runs(self, parent_id: uuid.UUID | str) -> list[FlowRun]:
        """The subflow runs a flow run started, oldest first (one level down)."""
        query = (
            select(FlowRun)
            .where(FlowRun.parent_id == as_uuid(parent_id))
            .order_by(FlowRun.created_at, FlowRun.id)
        )
        with self.session() as session:
            return list(session.scalars(query))

    # -- summary --------------------------------------------------------------------

    def counts(self) -> dict[str, Any]:
        """Number of records per table and observations per status."""
        with self.session() as session:
            totals = {
                model.__tablename__: session.scalar(select(func.count()).select_from(model))
                for model in (Observation, Product, Candidate, FlowRun)
            }
            by_status = dict(
                session.execute(
                    select(Observation.status, func.count()).group_by(Observation.status)
                ).all()
            )
        return {**totals, "observations_by_status": by_status}

    @staticmethod
    def _observation(session: Session, observation_id: uuid.UUID | str) -> Observation:
        observation = session.get(Observation, as_uuid(observation_id))
        if observation is None:
            raise NotFoundError(f"no observation {observation_id} in the catalogue")
        return observation


def _flow_run_filter(
    query: Any,
    flow_type: FlowType | None,
    status: FlowState | None,
    since: datetime | None,
    until: datetime | None,
    *,
    top_level: bool,
) -> Any:
    if flow_type is not None:
        query = query.where(FlowRun.flow_type == FlowType(flow_type).value)
    if status is not None:
        query = query.where(FlowRun.status == FlowState(status).value)
    if since is not None:
        query = query.where(FlowRun.created_at >= since)
    if until is not None:
        query = query.where(FlowRun.created_at < until)
    if top_level:
        query = query.where(FlowRun.parent_id.is_(None))
    return query


def unreachable_message(database_url: str, error: BaseException) -> str:
    """What to tell a user whose catalogue database server cannot be reached.

    Parameters
    ----------
    database_url : str
        The catalogue's SQLAlchemy URL; shown with its password masked.
    error : BaseException
        The driver's error (SQLAlchemy's wrapper or the DBAPI exception itself).

    Returns
    -------
    str
    """
    try:
        shown = make_url(database_url).render_as_string(hide_password=True)
    except ArgumentError:
        shown = "the configured database_url"
    cause = getattr(error, "orig", None) or error
    detail = " ".join(str(cause).split())[:300] or type(cause).__name__
    password = _password(database_url)
    if password:
        detail = detail.replace(password, "***")
    return (
        f"cannot reach the catalogue database {shown} ({detail}): check that the database "
        "server is running and accepts connections there, and that ASTR_DATABASE_URL is "
        "right; the catalogue reconnects by itself once the server is back"
    )


def _password(database_url: str) -> str | None:
    try:
        return make_url(database_url).password
    except ArgumentError:
        return None


def as_uuid(value: uuid.UUID | str) -> uuid.UUID:
    """A record id as a UUID; NotFoundError (naming the value) when it is not one."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise NotFoundError(f"{value!r} is not a valid id (expected a UUID)") from None


def _check_sha256(what: str, digest: str) -> None:
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise CatalogueError(f"{what} must be 64 lower-case hex digits, got {digest!r}")


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _candidate(number: int, row: Mapping[str, Any], run_id: str | None) -> Candidate:
    if "x" not in row or "y" not in row:
        raise CatalogueError(f"candidate {number} has no x/y pixel position: {dict(row)!r}")
    values = {key: _finite_or_none(row.get(key)) for key in CANDIDATE_COLUMNS if key != "flags"}
    if values["x"] is None or values["y"] is None:
        raise CatalogueError(f"candidate {number} has a non-finite position: {dict(row)!r}")
    extra = {k: v for k, v in row.items() if k not in CANDIDATE_COLUMNS}
    return Candidate(
        number=number,
        flags=int(row.get("flags", 0) or 0),
        run_id=run_id,
        properties=extra,
        **values,
    )
