"""Alert routing: which failure tells whom, through which channel, and how often.

A failure becomes an *alert* keyed by its flow type and an error *fingerprint* (the
error's type and first line with ids, numbers and hashes blanked out). Routes are
chosen by rules (flow type globs, a minimum severity) and each has channels: ``log``,
``jsonl`` (a JSON-lines file), ``webhook`` (JSON POST), ``slack`` (a Slack-style
``{"text": ...}`` POST) and ``email`` (SMTP).

- **Deduplicated**: the same failure again within ``dedup_window_s`` of the last one
  counts on the existing alert (``count``) instead of sending a new one.
- **Throttled**: at most ``throttle_max`` notifications per route per
  ``throttle_period_s``; the others are recorded as ``throttled``.
- **Escalated** to the next matching route when the failure repeats ``escalate_after``
  times within ``escalate_window_s`` (counted since the last escalation), or when the
  alert stays unacknowledged ``ack_timeout_s`` after it reached its route
  (:func:`check_overdue_alerts`, run on every new failure and by ``astr alerts check``).
  An acknowledged alert still absorbs repeats but escalates no further.

The routes of an alert are the routes that match it, in order: settings routes
(``[alerting]`` in ``environments/<env>.toml``) first, then routes stored in the
catalogue by ``create_flow_alerts``. Level 0 is the first, each escalation moves one on.

Nothing is sent unless ``alerting_enabled`` is true; with it on and no route
configured, alerts go to the log (route ``default``). Delivery never raises: a failing
channel is logged and recorded on the delivery, and every network call has a timeout.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import re
import smtplib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from pipeline.config import ALERT_SECRET_PREFIX, WorkflowConfig
from pipeline.errors import ConfigError
from pipeline.store import Catalogue
from pipeline.store.alerts import OPEN, AlertStore
from pipeline.store.models import Alert, AlertDelivery

__all__ = [
    "CHANNEL_TYPES",
    "DEFAULT_ROUTE",
    "ROUTE_DEFAULTS",
    "SEVERITIES",
    "AlertOutcome",
    "Channel",
    "ChannelError",
    "Notice",
    "Route",
    "acknowledge_alert",
    "active_routes",
    "check_overdue_alerts",
    "error_cause",
    "fingerprint",
    "matching_routes",
    "parse_alerting",
    "parse_route",
    "raise_alert",
    "send",
]

log = logging.getLogger(__name__)

SEVERITIES = ("info", "warning", "error", "critical")
CHANNEL_TYPES = ("log", "jsonl", "webhook", "slack", "email")

#: Settings of a route when neither it nor the ``[alerting]`` table gives them.
ROUTE_DEFAULTS: dict[str, Any] = {
    "flow_types": ["*"],
    "min_severity": "warning",
    "dedup_window_s": 3600,
    "throttle_max": 20,
    "throttle_period_s": 3600,
    "escalate_after": 3,
    "escalate_window_s": 3600,
    "ack_timeout_s": 1800,
    "timeout_s": 5.0,
}
_NUMBERS = {
    "dedup_window_s": (0, 30 * 86400),
    "throttle_max": (1, 100_000),
    "throttle_period_s": (1, 30 * 86400),
    "escalate_after": (2, 10_000),
    "escalate_window_s": (1, 30 * 86400),
    "ack_timeout_s": (0, 30 * 86400),
    "timeout_s": (0.1, 120),
}
_CHANNEL_KEYS: dict[str, tuple[set[str], set[str]]] = {
    # type: (required, optional)
    "log": (set(), {"level"}),
    "jsonl": ({"path"}, set()),
    "webhook": (set(), {"url", "url_secret", "headers"}),
    "slack": (set(), {"url", "url_secret"}),
    "email": (
        {"host", "from", "to"},
        {"port", "username", "password_secret", "starttls", "ssl"},
    ),
}
_SECRET_NAME = re.compile(r"^[a-z0-9_]+$")
_KEEP = 50  # flow run ids and occurrence times kept per alert
_VOLATILE = (
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I), "<id>"),
    (re.compile(r"0x[0-9a-f]+", re.I), "<hex>"),
    (re.compile(r"\b[0-9a-f]{12,}\b", re.I), "<hash>"),
    (re.compile(r"\d+(?:\.\d+)?"), "<n>"),
)


class ChannelError(Exception):
    """A channel could not deliver a notice (the message says which and why)."""


# -- configuration -------------------------------------------------------------------


@dataclass(frozen=True)
class Channel:
    """One way of telling someone: a type and its validated options."""

    type: str
    options: dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        """Short description without secrets (``webhook http://host/path``)."""
        target = self.options.get("url") or self.options.get("path") or ""
        if self.type == "email":
            target = ",".join(self.options["to"])
        if self.options.get("url_secret"):
            target = f"<{ALERT_SECRET_PREFIX}{self.options['url_secret'].upper()}>"
        return f"{self.type} {target}".strip()


@dataclass(frozen=True)
class Route:
    """Where alerts of some flow types and severities go, with the route's policy."""

    name: str
    channels: tuple[Channel, ...]
    flow_types: tuple[str, ...] = ("*",)
    min_severity: str = "warning"
    dedup_window_s: float = 3600
    throttle_max: int = 20
    throttle_period_s: float = 3600
    escalate_after: int = 3
    escalate_window_s: float = 3600
    ack_timeout_s: float = 1800
    timeout_s: float = 5.0

    def matches(self, flow_type: str, severity: str) -> bool:
        """Whether an alert of ``flow_type`` at ``severity`` takes this route."""
        severe = SEVERITIES.index(severity) >= SEVERITIES.index(self.min_severity)
        return severe and any(fnmatch.fnmatchcase(flow_type, p) for p in self.flow_types)


#: Where alerts go when alerting is on and no route is configured.
DEFAULT_ROUTE = Route(name="default", channels=(Channel("log"),))


def parse_alerting(table: Mapping[str, Any], where: str = "alerting") -> list[Route]:
    """Validate an ``[alerting]`` table: route defaults and ``routes``.

    Parameters
    ----------
    table : mapping
        ``{"routes": [route, ...], <any ROUTE_DEFAULTS key>: default, ...}``.
    where : str
        Name used in error messages.

    Returns
    -------
    list of Route

    Raises
    ------
    ConfigError
        Naming the bad key (``alerting.routes[1].channels[0].url``) and what is allowed.
    """
    unknown = set(table) - {"routes", *ROUTE_DEFAULTS}
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: routes, "
            + ", ".join(ROUTE_DEFAULTS)
        )
    defaults = {key: table.get(key, value) for key, value in ROUTE_DEFAULTS.items()}
    # the defaults must be valid even while no route uses them
    parse_route({"name": "defaults", "channels": [{"type": "log"}]}, where, defaults)
    routes = table.get("routes", [])
    if not isinstance(routes, list):
        raise ConfigError(f"{where}.routes must be an array of tables ([[alerting.routes]])")
    parsed = [parse_route(r, f"{where}.routes[{i}]", defaults) for i, r in enumerate(routes)]
    _unique_names(parsed, where)
    return parsed


def parse_route(
    data: Any, where: str = "route", defaults: Mapping[str, Any] | None = None
) -> Route:
    """Validate one route table.

    Parameters
    ----------
    data : mapping
        ``name``, ``channels`` (list of channel tables, each with ``type``) and
        optionally any key of :data:`ROUTE_DEFAULTS`.
    where : str
        Name used in error messages.
    defaults : mapping, optional
        Values of the keys the route leaves out (default :data:`ROUTE_DEFAULTS`).

    Returns
    -------
    Route
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a table with name and channels")
    unknown = set(data) - {"name", "channels", *ROUTE_DEFAULTS}
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: name, channels, "
            + ", ".join(ROUTE_DEFAULTS)
        )
    values = {**ROUTE_DEFAULTS, **(defaults or {}), **data}
    name = values.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}.name must be a non-empty string")
    channels = values.get("channels")
    if not isinstance(channels, list) or not channels:
        raise ConfigError(
            f"{where}.channels must be a non-empty list, e.g. "
            '[{type = "webhook", url = "http://127.0.0.1:9000/alerts"}]'
        )
    severity = values["min_severity"]
    if severity not in SEVERITIES:
        raise ConfigError(
            f"{where}.min_severity={severity!r} is not allowed; choose one of: "
            + ", ".join(SEVERITIES)
        )
    flow_types = values["flow_types"]
    if isinstance(flow_types, str):
        flow_types = [flow_types]
    if not isinstance(flow_types, list) or not all(isinstance(p, str) and p for p in flow_types):
        raise ConfigError(
            f"{where}.flow_types must be a list of flow types or globs, e.g. ['observation_*']"
        )
    numbers = {key: _number(f"{where}.{key}", values[key], *_NUMBERS[key]) for key in _NUMBERS}
    return Route(
        name=name.strip(),
        channels=tuple(_channel(c, f"{where}.channels[{i}]") for i, c in enumerate(channels)),
        flow_types=tuple(flow_types),
        min_severity=severity,
        **numbers,
    )


def route_config(route: Route) -> dict[str, Any]:
    """A route as the plain table :func:`parse_route` reads back."""
    return {
        "name": route.name,
        "channels": [{"type": c.type, **c.options} for c in route.channels],
        "flow_types": list(route.flow_types),
        "min_severity": route.min_severity,
        **{key: getattr(route, key) for key in _NUMBERS},
    }


def check_secrets(routes: Iterable[Route], secrets: Mapping[str, str]) -> None:
    """Fail when a channel names a secret that is not in the environment."""
    for route in routes:
        for channel in route.channels:
            for key in ("url_secret", "password_secret"):
                name = channel.options.get(key)
                if name and name not in secrets:
                    raise ConfigError(
                        f"route {route.name!r}: channel {channel.type} needs secret {name!r}: "
                        f"set {ALERT_SECRET_PREFIX}{name.upper()} in the environment"
                    )


def active_routes(config: WorkflowConfig, catalogue: Catalogue) -> list[Route]:
    """Routes alerts may take now: settings routes, then stored ones; none when disabled.

    With alerting enabled and no route configured anywhere, :data:`DEFAULT_ROUTE`.
    """
    if not config.alerting_enabled:
        return []
    table = dict(config.alerting)
    routes = parse_alerting(table, "alerting (settings)")
    defaults = {key: table.get(key, value) for key, value in ROUTE_DEFAULTS.items()}
    for stored in AlertStore(catalogue).routes():
        try:
            routes.append(parse_route(stored, f"stored route {stored['name']!r}", defaults))
        except ConfigError as exc:
            log.error("alert route skipped: %s", exc)
    return routes or [DEFAULT_ROUTE]


def matching_routes(routes: Sequence[Route], flow_type: str, severity: str) -> list[Route]:
    """The routes an alert takes, in escalation order."""
    return [route for route in routes if route.matches(flow_type, severity)]


def _channel(data: Any, where: str) -> Channel:
    if not isinstance(data, Mapping) or "type" not in data:
        raise ConfigError(f"{where} must be a table with a type ({', '.join(CHANNEL_TYPES)})")
    kind = data["type"]
    if kind not in _CHANNEL_KEYS:
        raise ConfigError(
            f"{where}.type={kind!r} is not allowed; choose one of: {', '.join(CHANNEL_TYPES)}"
        )
    required, optional = _CHANNEL_KEYS[kind]
    options = {k: v for k, v in data.items() if k != "type"}
    unknown = set(options) - required - optional
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))} for a {kind} channel; "
            f"allowed: {', '.join(sorted(required | optional))}"
        )
    missing = required - set(options)
    if missing:
        raise ConfigError(f"{where}: a {kind} channel needs {', '.join(sorted(missing))}")
    if kind in ("webhook", "slack"):
        _check_url_or_secret(where, options)
    if kind == "email":
        options = _email_options(where, options)
    if kind == "jsonl" and not Path(str(options["path"])).is_absolute():
        raise ConfigError(
            f"{where}.path={options['path']!r} must be absolute (use {{home}}/alerts.jsonl)"
        )
    levels = logging.getLevelNamesMapping()
    if kind == "log" and str(options.get("level", "ERROR")).upper() not in levels:
        raise ConfigError(f"{where}.level={options['level']!r} is not a logging level")
    for key in ("url_secret", "password_secret"):
        if key in options and not _SECRET_NAME.match(str(options[key])):
            raise ConfigError(
                f"{where}.{key}={options[key]!r} must be a lower-case name (letters, digits, _); "
                f"its value is read from {ALERT_SECRET_PREFIX}<NAME>"
            )
    return Channel(kind, options)


def _check_url_or_secret(where: str, options: dict[str, Any]) -> None:
    if ("url" in options) == ("url_secret" in options):
        raise ConfigError(
            f"{where}: give exactly one of url (a URL without credentials) or url_secret "
            f"(a name; the URL is read from {ALERT_SECRET_PREFIX}<NAME>)"
        )
    url = options.get("url")
    if url is not None and not re.match(r"^https?://[^/\s]+", str(url)):
        raise ConfigError(f"{where}.url={url!r} is not an http(s) URL")
    headers = options.get("headers", {})
    if not isinstance(headers, Mapping) or not all(isinstance(v, str) for v in headers.values()):
        raise ConfigError(f"{where}.headers must be a table of strings")


def _email_options(where: str, options: dict[str, Any]) -> dict[str, Any]:
    to = options["to"]
    recipients = [to] if isinstance(to, str) else to
    if not isinstance(recipients, list) or not recipients or not all("@" in r for r in recipients):
        raise ConfigError(f"{where}.to must be an address or a list of addresses")
    if "@" not in str(options["from"]):
        raise ConfigError(f"{where}.from={options['from']!r} is not an e-mail address")
    port = options.get("port", 25)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"{where}.port={port!r} must be an integer from 1 to 65535")
    for flag in ("starttls", "ssl"):
        if not isinstance(options.get(flag, False), bool):
            raise ConfigError(f"{where}.{flag} must be true or false")
    return {**options, "to": list(recipients), "port": port}


def _number(where: str, value: Any, low: float, high: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ConfigError(f"{where}={value!r} must be a number from {low} to {high}")
    return value


def _unique_names(routes: Sequence[Route], where: str) -> None:
    seen: set[str] = set()
    for route in routes:
        if route.name in seen:
            raise ConfigError(f"{where}: two routes are named {route.name!r}; names must differ")
        seen.add(route.name)


# -- fingerprints --------------------------------------------------------------------


def error_cause(error: BaseException | str) -> str:
    """The error's type and first line with ids, hashes and numbers blanked out.

    ``FileNotFoundError: /data/night-12/a.fits missing`` becomes
    ``FileNotFoundError: /data/night-<n>/a.fits missing``: what stays the same when
    the same fault strikes again.
    """
    is_exception = isinstance(error, BaseException)
    kind, text = (type(error).__name__, str(error)) if is_exception else ("", str(error))
    first = next((line.strip() for line in str(text).splitlines() if line.strip()), "")
    for pattern, placeholder in _VOLATILE:
        first = pattern.sub(placeholder, first)
    return (f"{kind}: {first}" if kind else first)[:300]


def fingerprint(flow_type: str, error: BaseException | str) -> str:
    """Hash of a flow type and an error's cause: equal for repeats of one fault."""
    return hashlib.sha256(f"{flow_type}\n{error_cause(error)}".encode()).hexdigest()


# -- notices and channels ------------------------------------------------------------


@dataclass(frozen=True)
class Notice:
    """What one notification says."""

    alert_id: str
    flow_type: str
    flow_run_id: str | None
    severity: str
    title: str
    message: str
    error_type: str | None
    fingerprint: str
    count: int
    level: int
    reason: str
    route: str
    first_seen: str
    last_seen: str
    failed_at: str | None = None
    url: str | None = None

    def payload(self) -> dict[str, Any]:
        """JSON body of a webhook and line of a JSON-lines file."""
        return {
            "alert_id": self.alert_id,
            "flow_type": self.flow_type,
            "flow_run_id": self.flow_run_id,
            "severity": self.severity,
            "title": self.title,
            "message": self.message,
            "error_type": self.error_type,
            "fingerprint": self.fingerprint,
            "count": self.count,
            "level": self.level,
            "reason": self.reason,
            "route": self.route,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "failed_at": self.failed_at,
            "url": self.url,
            "sent_at": datetime.now(UTC).isoformat(),
        }

    def text(self) -> str:
        """Plain-text body of a Slack message or an e-mail."""
        why = {
            "new": "",
            "repeat": f" (escalated: failed {self.count} times since {self.first_seen})",
            "unacknowledged": " (escalated: not acknowledged in time)",
        }.get(self.reason, "")
        lines = [
            f"[{self.severity.upper()}] {self.title}{why}",
            self.message,
            f"flow run: {self.flow_run_id}" + (f" ({self.url})" if self.url else ""),
            f"alert {self.alert_id}: acknowledge with `astr alerts ack {self.alert_id}`",
        ]
        return "\n".join(line for line in lines if line)


def send(
    channel: Channel, notice: Notice, secrets: Mapping[str, str], timeout: float = 5.0
) -> None:
    """Deliver ``notice`` through ``channel``.

    Raises
    ------
    ChannelError
        Saying which channel failed and why (unreachable, refused, secret missing).
    """
    try:
        _SENDERS[channel.type](channel.options, notice, secrets, timeout)
    except ChannelError:
        raise
    except (OSError, smtplib.SMTPException, ValueError) as exc:
        raise ChannelError(f"{channel.label()}: {type(exc).__name__}: {exc}") from exc


def _send_log(options: dict[str, Any], notice: Notice, secrets: Any, timeout: float) -> None:
    default = "CRITICAL" if notice.severity == "critical" else "ERROR"
    if notice.severity in ("info", "warning"):
        default = notice.severity.upper()
    level = logging.getLevelNamesMapping()[str(options.get("level", default)).upper()]
    log.log(level, "ALERT %s", notice.text().replace("\n", " | "))


def _send_jsonl(options: dict[str, Any], notice: Notice, secrets: Any, timeout: float) -> None:
    path = Path(options["path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(notice.payload(), sort_keys=True) + "\n")


def _send_webhook(
    options: dict[str, Any], notice: Notice, secrets: Mapping[str, str], timeout: float
) -> None:
    _post(_url(options, secrets), notice.payload(), options.get("headers", {}), timeout)


def _send_slack(
    options: dict[str, Any], notice: Notice, secrets: Mapping[str, str], timeout: float
) -> None:
    _post(_url(options, secrets), {"text": notice.text()}, {}, timeout)


def _send_email(
    options: dict[str, Any], notice: Notice, secrets: Mapping[str, str], timeout: float
) -> None:
    message = EmailMessage()
    message["Subject"] = f"[astr {notice.severity}] {notice.title}"
    message["From"] = options["from"]
    message["To"] = ", ".join(options["to"])
    message.set_content(notice.text())
    smtp_class = smtplib.SMTP_SSL if options.get("ssl") else smtplib.SMTP
    with smtp_class(options["host"], options.get("port", 25), timeout=timeout) as smtp:
        if options.get("starttls"):
            smtp.starttls()
        if options.get("username"):
            smtp.login(options["username"], _secret(options, "password_secret", secrets))
        smtp.send_message(message)


def _post(url: str, body: dict[str, Any], headers: Mapping[str, str], timeout: float) -> None:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **headers},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        raise ChannelError(f"POST {_shown(url)} answered HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ChannelError(f"POST {_shown(url)} failed: {reason}") from None


def _url(options: Mapping[str, Any], secrets: Mapping[str, str]) -> str:
    return str(options["url"]) if "url" in options else _secret(options, "url_secret", secrets)


def _secret(options: Mapping[str, Any], key: str, secrets: Mapping[str, str]) -> str:
    name = options.get(key)
    if not name:
        raise ChannelError(f"the channel has a username but no {key}")
    if name not in secrets:
        raise ChannelError(
            f"secret {name!r} is not set: export {ALERT_SECRET_PREFIX}{name.upper()}"
        )
    return secrets[name]


def _shown(url: str) -> str:
    """A URL with its path hidden (webhook paths often carry the token)."""
    match = re.match(r"^(https?://[^/]+)", url)
    return f"{match.group(1)}/..." if match else "<url>"


_SENDERS = {
    "log": _send_log,
    "jsonl": _send_jsonl,
    "webhook": _send_webhook,
    "slack": _send_slack,
    "email": _send_email,
}


# -- deciding and delivering ---------------------------------------------------------


@dataclass(frozen=True)
class AlertOutcome:
    """What one evaluation did: the alert and each route notified (or throttled)."""

    alert_id: str
    count: int
    level: int
    deliveries: tuple[tuple[str, str, str], ...] = ()  # (route, reason, status)


@dataclass(frozen=True)
class _Plan:
    delivery_id: int
    route: Route
    notice: Notice
    throttled: bool


def raise_alert(
    catalogue: Catalogue,
    config: WorkflowConfig,
    *,
    flow_type: str,
    error: BaseException | str,
    flow_run_id: str | None = None,
    severity: str = "error",
    title: str | None = None,
    failed_at: datetime | None = None,
    routes: Sequence[Route] | None = None,
    now: datetime | None = None,
) -> AlertOutcome | None:
    """Record a failure and notify, deduplicated, throttled and escalated.

    Parameters
    ----------
    catalogue : Catalogue
    config : WorkflowConfig
        ``alerting_enabled``, the ``[alerting]`` routes, secrets, Prefect UI address.
    flow_type : str
        Flow type of the failed run.
    error : Exception or str
        What went wrong.
    flow_run_id : str, optional
    severity : str
        One of :data:`SEVERITIES`.
    title : str, optional
        Headline (default: ``<flow_type> failed``).
    failed_at : datetime, optional
        When the run failed (its state's timestamp), carried in the notice.
    routes : sequence of Route, optional
        Default: :func:`active_routes`.
    now : datetime, optional
        Evaluation time (default: the current time).

    Returns
    -------
    AlertOutcome or None
        None when alerting is off or no route takes this alert.
    """
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity!r} is not one of {', '.join(SEVERITIES)}")
    now = now or datetime.now(UTC)
    routes = list(routes) if routes is not None else active_routes(config, catalogue)
    chain = matching_routes(routes, flow_type, severity)
    if not chain:
        return None
    store = AlertStore(catalogue)
    key = fingerprint(flow_type, error)
    with store.locked(flow_type, key) as session:
        alert = store.active_alert(
            session, flow_type, key, now - timedelta(seconds=chain[0].dedup_window_s)
        )
        if alert is None:
            alert = _new_alert(flow_type, key, severity, error, title, now)
            session.add(alert)
            reason = "new"
        else:
            reason = _repeat(alert, chain, now)
        _occurred(alert, flow_run_id, now)
        session.flush()
        plans = []
        if reason is not None:
            plans.append(
                _plan(session, store, alert, chain, reason, now, config, flow_run_id, failed_at)
            )
        outcome_base = (str(alert.id), alert.count, alert.level)
    outcome = _deliver(store, config, plans)
    return AlertOutcome(*outcome_base, deliveries=outcome)


def check_overdue_alerts(
    catalogue: Catalogue,
    config: WorkflowConfig,
    *,
    routes: Sequence[Route] | None = None,
    now: datetime | None = None,
) -> list[AlertOutcome]:
    """Escalate every open alert left unacknowledged past its route's ``ack_timeout_s``.

    Run on every new failure, by ``astr alerts check`` (``--every`` to repeat) and by
    anything else that wants it periodically.

    Returns
    -------
    list of AlertOutcome
        One per escalated alert.
    """
    now = now or datetime.now(UTC)
    routes = list(routes) if routes is not None else active_routes(config, catalogue)
    if not routes:
        return []
    store = AlertStore(catalogue)
    outcomes = []
    for candidate in store.overdue_candidates():
        chain = matching_routes(routes, candidate.flow_type, candidate.severity)
        if not _overdue(candidate, chain, now):
            continue
        with store.locked(candidate.flow_type, candidate.fingerprint) as session:
            alert = session.get(Alert, candidate.id)
            if alert is None or alert.status != OPEN or not _overdue(alert, chain, now):
                continue  # acknowledged or escalated meanwhile
            alert.level += 1
            alert.escalated_at = now
            plan = _plan(session, store, alert, chain, "unacknowledged", now, config, None, None)
            base = (str(alert.id), alert.count, alert.level)
        outcomes.append(AlertOutcome(*base, deliveries=_deliver(store, config, [plan])))
    return outcomes


def acknowledge_alert(catalogue: Catalogue, alert_id: str, by: str | None = None) -> Alert:
    """Acknowledge an alert: it escalates no further. Unknown ids raise NotFoundError."""
    return AlertStore(catalogue).acknowledge(alert_id, by)


def _new_alert(
    flow_type: str,
    key: str,
    severity: str,
    error: BaseException | str,
    title: str | None,
    now: datetime,
) -> Alert:
    error_type = type(error).__name__ if isinstance(error, BaseException) else None
    text = str(error).strip() or error_type or "unknown error"
    return Alert(
        id=uuid.uuid4(),
        flow_type=flow_type,
        fingerprint=key,
        severity=severity,
        status=OPEN,
        title=title or f"{flow_type} failed",
        message=(f"{error_type}: {text}" if error_type else text)[:4000],
        error_type=error_type,
        count=0,
        level=0,
        flow_run_ids=[],
        occurrences=[],
        first_seen=now,
        last_seen=now,
    )


def _repeat(alert: Alert, chain: Sequence[Route], now: datetime) -> str | None:
    """``"repeat"`` when this repeat escalates the alert (its level is moved on), else None.

    Counts this occurrence with those since the last escalation, within the current
    route's ``escalate_window_s``.
    """
    level = min(alert.level, len(chain) - 1)
    route = chain[level]
    if alert.status != OPEN or level + 1 >= len(chain):
        return None
    since = now - timedelta(seconds=route.escalate_window_s)
    if alert.escalated_at is not None:
        since = max(since, alert.escalated_at + timedelta(microseconds=1))
    recent = [t for t in map(datetime.fromisoformat, alert.occurrences) if t >= since]
    if len(recent) + 1 < route.escalate_after:
        return None
    alert.level = level + 1
    alert.escalated_at = now
    return "repeat"


def _overdue(alert: Alert, chain: Sequence[Route], now: datetime) -> bool:
    level = min(alert.level, len(chain) - 1)
    if not chain or level + 1 >= len(chain) or chain[level].ack_timeout_s <= 0:
        return False
    reached = alert.escalated_at or alert.first_seen
    return now - reached >= timedelta(seconds=chain[level].ack_timeout_s)


def _occurred(alert: Alert, flow_run_id: str | None, now: datetime) -> None:
    alert.count = (alert.count or 0) + 1
    alert.last_seen = now
    alert.occurrences = [*(alert.occurrences or []), now.isoformat()][-_KEEP:]
    if flow_run_id:
        alert.flow_run_ids = [*(alert.flow_run_ids or []), str(flow_run_id)][-_KEEP:]


def _plan(
    session: Any,
    store: AlertStore,
    alert: Alert,
    chain: Sequence[Route],
    reason: str,
    now: datetime,
    config: WorkflowConfig,
    flow_run_id: str | None,
    failed_at: datetime | None,
) -> _Plan:
    """Record one delivery (pending, or throttled when the route is over its limit)."""
    route = chain[min(alert.level, len(chain) - 1)]
    since = now - timedelta(seconds=route.throttle_period_s)
    throttled = store.deliveries_since(session, route.name, since) >= route.throttle_max
    delivery = AlertDelivery(
        alert_id=alert.id,
        route=route.name,
        level=alert.level,
        reason=reason,
        status="throttled" if throttled else "pending",
        channels={},
        created_at=now,
    )
    session.add(delivery)
    session.flush()
    run_id = flow_run_id or (alert.flow_run_ids[-1] if alert.flow_run_ids else None)
    notice = Notice(
        alert_id=str(alert.id),
        flow_type=alert.flow_type,
        flow_run_id=run_id,
        severity=alert.severity,
        title=alert.title,
        message=alert.message,
        error_type=alert.error_type,
        fingerprint=alert.fingerprint,
        count=alert.count,
        level=alert.level,
        reason=reason,
        route=route.name,
        first_seen=alert.first_seen.isoformat(),
        last_seen=alert.last_seen.isoformat(),
        failed_at=failed_at.isoformat() if failed_at else None,
        url=_run_url(config, run_id),
    )
    return _Plan(delivery.id, route, notice, throttled)


def _deliver(
    store: AlertStore, config: WorkflowConfig, plans: Sequence[_Plan]
) -> tuple[tuple[str, str, str], ...]:
    """Send the planned notices (outside the deciding transaction); never raises."""
    done = []
    for plan in plans:
        if plan.throttled:  # recorded, not sent
            log.warning("alert %s to route %s throttled", plan.notice.alert_id, plan.route.name)
            done.append((plan.route.name, plan.notice.reason, "throttled"))
            continue
        results: dict[str, str] = {}
        for index, channel in enumerate(plan.route.channels):
            label = f"{index}:{channel.type}"
            try:
                send(channel, plan.notice, config.alert_secrets, plan.route.timeout_s)
                results[label] = "sent"
            except ChannelError as exc:
                log.error("alert %s: route %s: %s", plan.notice.alert_id, plan.route.name, exc)
                results[label] = str(exc)[:500]
        status = "sent" if any(v == "sent" for v in results.values()) else "failed"
        try:
            store.set_delivery(plan.delivery_id, status, results)
        except Exception as exc:  # the notice went out; the record is secondary
            log.error("alert delivery %s not recorded: %s", plan.delivery_id, exc)
        done.append((plan.route.name, plan.notice.reason, status))
    return tuple(done)


def _run_url(config: WorkflowConfig, flow_run_id: str | None) -> str | None:
    if not flow_run_id:
        return None
    return f"{config.prefect_server_url.removesuffix('/api')}/runs/flow-run/{flow_run_id}"
