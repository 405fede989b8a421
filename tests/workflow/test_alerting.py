"""Alert routing against real receivers: dedup, throttle, escalation, channels, settings."""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alerting_servers import http_receiver, smtp_server
from procs import free_port

from pipeline.config import WorkflowConfig, describe, load_config
from pipeline.errors import ConfigError, NotFoundError
from pipeline.store import Catalogue
from pipeline.store.alerts import AlertStore
from pipeline.workflow import alerting
from pipeline.workflow.alerting import (
    acknowledge_alert,
    active_routes,
    check_overdue_alerts,
    error_cause,
    fingerprint,
    parse_alerting,
    parse_route,
    raise_alert,
)

T0 = datetime(2026, 12, 1, 20, 0, tzinfo=UTC)


def _config(tmp_path: Path, **changes) -> WorkflowConfig:
    base = load_config(environ={"ASTR_HOME": str(tmp_path / "home")}, cwd=tmp_path)
    return dataclasses.replace(base, alerting_enabled=True, **changes)


def _route(name: str, url: str, **policy) -> alerting.Route:
    return parse_route({"name": name, "channels": [{"type": "webhook", "url": url}], **policy})


def _fail(catalogue, config, routes, error, *, at, run="r", flow_type="observation_pipeline"):
    return raise_alert(
        catalogue,
        config,
        flow_type=flow_type,
        error=error,
        flow_run_id=run,
        routes=routes,
        now=at,
    )


# -- configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ({"routes": [{"name": "a"}]}, "alerting.routes[0].channels"),
        (
            {"routes": [{"name": "a", "channels": [{"type": "pager"}]}]},
            "routes[0].channels[0].type",
        ),
        (
            {"routes": [{"name": "a", "channels": [{"type": "webhook", "url": "ftp://x"}]}]},
            "routes[0].channels[0].url",
        ),
        (
            {"routes": [{"name": "a", "channels": [{"type": "email", "host": "h"}]}]},
            "needs from, to",
        ),
        ({"routes": [{"name": "a", "channels": [{"type": "log"}], "colour": 1}]}, "colour"),
        (
            {"routes": [{"name": "a", "channels": [{"type": "log"}], "min_severity": "meh"}]},
            "routes[0].min_severity",
        ),
        (
            {"routes": [{"name": "a", "channels": [{"type": "log"}], "escalate_after": 0}]},
            "routes[0].escalate_after",
        ),
        ({"routes": [{"name": "a", "channels": [{"type": "jsonl", "path": "x"}]}]}, "absolute"),
        ({"throttle_max": -1}, "throttle_max"),
        ({"dedup": 5}, "unknown key(s) dedup"),
    ],
)
def test_bad_alerting_settings_name_the_key(table, named):
    with pytest.raises(ConfigError, match="alerting") as info:
        parse_alerting(table)
    assert named in str(info.value)


def test_settings_file_routes_and_secrets(tmp_path):
    (tmp_path / "dev.toml").write_text(
        "alerting_enabled = true\n"
        "[alerting]\nescalate_after = 4\n"
        "[[alerting.routes]]\nname = 'team'\nflow_types = ['observation_*']\n"
        "channels = [{type = 'jsonl', path = '{home}/alerts.jsonl'},"
        " {type = 'slack', url_secret = 'slack'}]\n"
    )
    env = {"ASTR_HOME": str(tmp_path / "h"), "ASTR_ALERT_SECRET_SLACK": "http://hook/T0K3N"}
    config = load_config(environ=env, config_dir=tmp_path, cwd=tmp_path)
    (route,) = parse_alerting(config.alerting)
    assert route.escalate_after == 4 and route.flow_types == ("observation_*",)
    assert route.channels[0].options["path"] == str(tmp_path / "h" / "alerts.jsonl")
    assert config.alert_secrets == {"slack": "http://hook/T0K3N"}
    assert "T0K3N" not in repr(config) and "T0K3N" not in json.dumps(describe(config))
    alerting.check_secrets([route], config.alert_secrets)
    with pytest.raises(ConfigError, match="ASTR_ALERT_SECRET_SLACK"):
        alerting.check_secrets([route], {})


def test_a_secret_in_the_settings_file_is_refused(tmp_path):
    (tmp_path / "dev.toml").write_text(
        "[[alerting.routes]]\nname = 'mail'\n"
        "channels = [{type = 'email', host = 'h', from = 'a@b', to = 'c@d', password = 'x'}]\n"
    )
    with pytest.raises(ConfigError, match=r"password looks like a secret.*password_secret"):
        load_config(environ={}, config_dir=tmp_path, cwd=tmp_path)


def test_alerting_off_sends_nothing_and_on_without_routes_logs(tmp_path, catalogue, caplog):
    config = _config(tmp_path)
    assert active_routes(dataclasses.replace(config, alerting_enabled=False), catalogue) == []
    assert active_routes(config, catalogue) == [alerting.DEFAULT_ROUTE]
    off = dataclasses.replace(config, alerting_enabled=False)
    assert raise_alert(catalogue, off, flow_type="model_training", error=ValueError("x")) is None
    with caplog.at_level("ERROR", logger="pipeline.workflow.alerting"):
        outcome = raise_alert(catalogue, config, flow_type="model_training", error=ValueError("x"))
    assert outcome.deliveries == (("default", "new", "sent"),)
    assert any("ALERT [ERROR] model_training failed" in r.message for r in caplog.records)


# -- fingerprints --------------------------------------------------------------------


def test_fingerprint_ignores_ids_and_numbers_but_not_the_fault():
    a = FileNotFoundError("night 12: /data/4f1c2a9e-0000-4000-8000-000000000001.fits missing")
    b = FileNotFoundError("night 13: /data/9e1c2a9e-1111-4000-8000-000000000002.fits missing")
    assert error_cause(a) == "FileNotFoundError: night <n>: /data/<id>.fits missing"
    assert fingerprint("observation_pipeline", a) == fingerprint("observation_pipeline", b)
    assert fingerprint("observation_pipeline", a) != fingerprint("model_training", a)
    assert fingerprint("x", a) != fingerprint("x", ValueError(str(a)))


# -- dedup, throttle, escalation -----------------------------------------------------


@pytest.mark.integration
def test_repeats_are_deduplicated_then_escalated(tmp_path, catalogue):
    config = _config(tmp_path)
    with http_receiver() as (url, got):
        routes = [
            _route("team", f"{url}/team", escalate_after=3, escalate_window_s=600),
            _route("oncall", f"{url}/oncall"),
        ]
        error = RuntimeError("kernel died after 31 s")
        first = _fail(catalogue, config, routes, error, at=T0, run="run-1")
        second = _fail(
            catalogue,
            config,
            routes,
            RuntimeError("kernel died after 47 s"),
            at=T0 + timedelta(seconds=60),
            run="run-2",
        )
        assert second.alert_id == first.alert_id and second.count == 2
        assert second.deliveries == () and len(got.bodies("/team")) == 1
        third = _fail(catalogue, config, routes, error, at=T0 + timedelta(seconds=120), run="run-3")
        assert third.level == 1 and third.deliveries == (("oncall", "repeat", "sent"),)
        (escalated,) = got.wait_for(1, path="/oncall")
        assert escalated["count"] == 3 and escalated["reason"] == "repeat"
        assert escalated["flow_run_id"] == "run-3" and escalated["level"] == 1
        (notice,) = got.bodies("/team")
        assert notice["reason"] == "new" and notice["flow_type"] == "observation_pipeline"
        assert notice["message"] == "RuntimeError: kernel died after 31 s"
        # no route after "oncall": further repeats only count
        fourth = _fail(catalogue, config, routes, error, at=T0 + timedelta(seconds=180))
        assert fourth.count == 4 and fourth.deliveries == ()
        # after the dedup window (an hour by default) the same fault is a new alert
        later = _fail(catalogue, config, routes, error, at=T0 + timedelta(hours=2))
        assert later.alert_id != first.alert_id and later.count == 1
        assert len(got.wait_for(2, path="/team")) == 2
    record = AlertStore(catalogue).get(first.alert_id)
    assert record.flow_run_ids == ["run-1", "run-2", "run-3", "r"]


@pytest.mark.integration
def test_repeats_spread_wider_than_the_window_do_not_escalate(tmp_path, catalogue):
    config = _config(tmp_path)
    with http_receiver() as (url, got):
        routes = [
            _route("team", f"{url}/team", escalate_after=3, escalate_window_s=60),
            _route("oncall", f"{url}/oncall"),
        ]
        for minute in (0, 2, 4, 6):
            outcome = _fail(
                catalogue, config, routes, OSError("disk full"), at=T0 + timedelta(minutes=minute)
            )
        assert outcome.count == 4 and outcome.level == 0
        assert got.bodies("/oncall") == []


@pytest.mark.integration
def test_throttle_limits_notifications_per_route(tmp_path, catalogue):
    config = _config(tmp_path)
    with http_receiver() as (url, got):
        routes = [_route("team", f"{url}/team", throttle_max=2, throttle_period_s=600)]
        outcomes = [
            _fail(
                catalogue,
                config,
                routes,
                ValueError(f"fault {name}"),
                at=T0 + timedelta(seconds=10 * i),
            )
            for i, name in enumerate("abcd")
        ]
        assert [o.deliveries[0][2] for o in outcomes] == ["sent", "sent", "throttled", "throttled"]
        assert len(got.bodies()) == 2
        # a new period: the route may send again
        again = _fail(catalogue, config, routes, ValueError("fault e"), at=T0 + timedelta(hours=1))
        assert again.deliveries[0][2] == "sent" and len(got.wait_for(3)) == 3
        assert len({o.alert_id for o in outcomes}) == 4  # distinct faults: distinct alerts


@pytest.mark.integration
def test_unacknowledged_alert_escalates_and_acknowledged_does_not(tmp_path, catalogue):
    config = _config(tmp_path)
    with http_receiver() as (url, got):
        routes = [
            _route("team", f"{url}/team", ack_timeout_s=600),
            _route("oncall", f"{url}/oncall", ack_timeout_s=600),
            _route("manager", f"{url}/manager"),
        ]
        first = _fail(catalogue, config, routes, ValueError("bad header"), at=T0)
        other = _fail(catalogue, config, routes, ValueError("bad wcs"), at=T0)
        acknowledge_alert(catalogue, other.alert_id, by="ana")
        early = check_overdue_alerts(
            catalogue, config, routes=routes, now=T0 + timedelta(seconds=599)
        )
        assert early == []
        late = check_overdue_alerts(
            catalogue, config, routes=routes, now=T0 + timedelta(seconds=601)
        )
        assert [(o.alert_id, o.level) for o in late] == [(first.alert_id, 1)]
        (notice,) = got.wait_for(1, path="/oncall")
        assert notice["reason"] == "unacknowledged" and notice["alert_id"] == first.alert_id
        # the next level's own timeout counts from the escalation
        again = check_overdue_alerts(
            catalogue, config, routes=routes, now=T0 + timedelta(seconds=1000)
        )
        assert again == []
        third = check_overdue_alerts(
            catalogue, config, routes=routes, now=T0 + timedelta(seconds=1202)
        )
        assert [o.level for o in third] == [2] and len(got.wait_for(1, path="/manager")) == 1
        acked = AlertStore(catalogue).get(other.alert_id)
        assert acked.status == "acknowledged" and acked.acknowledged_by == "ana"
        assert acked.level == 0
    with pytest.raises(NotFoundError, match="no alert"):
        acknowledge_alert(catalogue, "00000000-0000-4000-8000-000000000000")


# -- channels ------------------------------------------------------------------------


@pytest.mark.integration
def test_email_reaches_the_smtp_server(tmp_path, catalogue):
    config = _config(tmp_path)
    with smtp_server() as (port, envelopes):
        route = parse_route(
            {
                "name": "mail",
                "channels": [
                    {
                        "type": "email",
                        "host": "127.0.0.1",
                        "port": port,
                        "from": "astr@example.org",
                        "to": ["night@example.org", "ops@example.org"],
                    }
                ],
            }
        )
        outcome = _fail(catalogue, config, [route], ValueError("no WCS"), at=T0, run="run-9")
        assert outcome.deliveries == (("mail", "new", "sent"),)
        (envelope,) = envelopes
    assert envelope.mail_from == "astr@example.org"
    assert envelope.rcpt_tos == ["night@example.org", "ops@example.org"]
    text = envelope.content.decode()
    assert "Subject: [astr error] observation_pipeline failed" in text
    assert "ValueError: no WCS" in text and outcome.alert_id in text and "run-9" in text


@pytest.mark.integration
def test_slack_jsonl_and_a_dead_channel(tmp_path, catalogue):
    config = _config(tmp_path, alert_secrets={"slack": ""})
    lines = tmp_path / "alerts.jsonl"
    dead = f"http://127.0.0.1:{free_port()}/hook"
    with http_receiver() as (url, got):
        config = dataclasses.replace(config, alert_secrets={"slack": f"{url}/slack/T0K3N"})
        route = parse_route(
            {
                "name": "all",
                "timeout_s": 2,
                "channels": [
                    {"type": "webhook", "url": dead},
                    {"type": "slack", "url_secret": "slack"},
                    {"type": "jsonl", "path": str(lines)},
                    {
                        "type": "email",
                        "host": "127.0.0.1",
                        "port": free_port(),
                        "from": "a@b.c",
                        "to": "d@e.f",
                        "username": "u",
                        "password_secret": "smtp",
                    },
                ],
            }
        )
        began = time.monotonic()
        outcome = _fail(catalogue, config, [route], ValueError("bad"), at=T0)
        assert time.monotonic() - began < 6
        (slack,) = got.wait_for(1, path="/slack/T0K3N")
    assert set(slack) == {"text"} and slack["text"].startswith(
        "[ERROR] observation_pipeline failed"
    )
    assert json.loads(lines.read_text())["alert_id"] == outcome.alert_id
    (delivery,) = AlertStore(catalogue).deliveries(outcome.alert_id)
    assert delivery.status == "sent"
    assert delivery.channels["1:slack"] == delivery.channels["2:jsonl"] == "sent"
    assert "POST http://127.0.0.1" in delivery.channels["0:webhook"]
    assert "/hook" not in delivery.channels["0:webhook"]  # paths may carry tokens
    assert (
        "Connection refused" in delivery.channels["3:email"]
        or "refused" in delivery.channels["3:email"].lower()
    )


def test_missing_secret_is_reported_on_the_delivery(tmp_path, catalogue):
    config = _config(tmp_path)
    route = parse_route({"name": "s", "channels": [{"type": "slack", "url_secret": "slack"}]})
    outcome = _fail(catalogue, config, [route], ValueError("x"), at=T0)
    assert outcome.deliveries == (("s", "new", "failed"),)
    (delivery,) = AlertStore(catalogue).deliveries(outcome.alert_id)
    assert "export ASTR_ALERT_SECRET_SLACK" in delivery.channels["0:slack"]


def test_routes_match_flow_type_globs_and_severity():
    route = parse_route(
        {
            "name": "obs",
            "channels": [{"type": "log"}],
            "flow_types": ["observation_*"],
            "min_severity": "error",
        }
    )
    assert route.matches("observation_pipeline", "error")
    assert route.matches("observation_ingestion", "critical")
    assert not route.matches("observation_pipeline", "warning")
    assert not route.matches("model_training", "critical")


def test_stored_routes_come_after_settings_routes(tmp_path, catalogue: Catalogue):
    config = _config(
        tmp_path,
        alerting={"escalate_after": 5, "routes": [{"name": "file", "channels": [{"type": "log"}]}]},
    )
    AlertStore(catalogue).save_route("stored", {"channels": [{"type": "log"}]})
    names = [(r.name, r.escalate_after) for r in active_routes(config, catalogue)]
    assert names == [("file", 5), ("stored", 5)]
