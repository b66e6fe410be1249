"""The deploy kit against the product: alert rules, dashboard, systemd unit and container file (issue 6).

What an operator or installer would hit first is checked here: rules Prometheus refuses to load, an
alert or a panel built on a metric the controller does not export (it would stay silent or empty
forever), a unit systemd rejects or runs with more privileges than it needs, a health check that
cannot reach the controller. The tools are the real ones (promtool, systemd-analyze); a test whose
tool is missing is skipped and says so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from router.config import parse_settings
from tests.integration.conftest import IO_TIMEOUT_S, FakeCsms, Lab

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "ocpp-lc.rules.yml"
DASHBOARD = DEPLOY / "grafana" / "ocpp-lc-site.json"
UNIT = DEPLOY / "ocpp-lc.service"
CONTAINERFILE = DEPLOY / "Containerfile"
EXAMPLE_CONFIG = DEPLOY / "ocpp-lc.example.toml"

METRIC_NAME = re.compile(r"\bocpp_lc_[a-z0-9_]+")
#: What the exposition adds to a histogram's family name.
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed here")
    return path


async def run_tool(*argv: str | os.PathLike[str], cwd: Path | None = None) -> tuple[int, str]:
    """Run ``argv`` and return its exit status and everything it printed."""
    with trio.fail_after(IO_TIMEOUT_S):
        done = await trio.run_process(list(argv), capture_stdout=True, capture_stderr=True, check=False, cwd=cwd)
    return done.returncode, (done.stdout + done.stderr).decode()


# ---------------------------------------------------------------------------------------------------
# Prometheus rules and the Grafana dashboard
# ---------------------------------------------------------------------------------------------------


def read_rules() -> dict[str, dict[str, str]]:
    """Each alert's ``expr``, ``summary`` and ``description``, as Prometheus reads them.

    The rules file writes each of these on one line (plain or double-quoted) or as a folded block
    (``>-``, lines joined by spaces); reading that much of YAML here spares the tests a YAML dependency.
    """
    alerts: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    lines = RULES.read_text().splitlines()
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("- alert:"):
            current = alerts.setdefault(stripped.removeprefix("- alert:").strip(), {})
            continue
        key, _, value = stripped.partition(":")
        if key not in ("expr", "summary", "description"):
            continue
        value = value.strip()
        if value == ">-":
            indent = len(line) - len(line.lstrip())
            block = []
            for following in lines[index + 1 :]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following.strip())
            value = " ".join(part for part in block if part)
        elif value.startswith('"'):
            value = json.loads(value)
        current[key] = value
    return alerts


def rule_expressions() -> list[str]:
    return [alert["expr"] for alert in read_rules().values()]


def dashboard_expressions(node: Any) -> Iterator[str]:
    """Every PromQL string in the dashboard: panel targets and template variable queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition", "query") and isinstance(value, str):
                yield value
            else:
                yield from dashboard_expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_expressions(item)


async def test_alert_rules_pass_promtool() -> None:
    promtool = tool("promtool")
    status, report = await run_tool(promtool, "check", "rules", RULES)
    assert status == 0, report
    assert "SUCCESS" in report, report


#: `promtool test rules` input: series (one sample a minute) and the alerts expected at given times.
#: Written as JSON, which is valid YAML.
RULE_TESTS: dict[str, Any] = {
    "evaluation_interval": "1m",
    "tests": [
        {
            "interval": "1m",
            "input_series": [
                # The own link drops at minute 2 and stays down.
                {"series": 'ocpp_lc_own_link_up{instance="lc:8080",job="ocpp-lc"}', "values": "1 1 0x20"},
                # 12 stations lost in 6 minutes; the controller's own shutdown of 50 pairs does not count.
                {
                    "series": 'ocpp_lc_pair_closes_total{instance="lc:8080",job="ocpp-lc",reason="station_lost"}',
                    "values": "0x4 2+2x5 12x10",
                },
                {
                    "series": 'ocpp_lc_pair_closes_total{instance="lc:8080",job="ocpp-lc",reason="shutdown"}',
                    "values": "0x10 50x10",
                },
                # A publish fails at minute 3.
                {
                    "series": 'ocpp_lc_firmware_downloads_total{instance="lc:8080",job="ocpp-lc",'
                    'outcome="invalid_checksum"}',
                    "values": "0 0 0 1x18",
                },
                {
                    "series": 'ocpp_lc_firmware_downloads_total{instance="lc:8080",job="ocpp-lc",outcome="published"}',
                    "values": "0 1 2 3x18",
                },
                # Phase L1 is measured over its 100 A limit from minute 3 to minute 6; L2 stays under.
                {
                    "series": 'ocpp_lc_balancing_measured_draw_amperes{instance="lc:8080",job="ocpp-lc",phase="L1"}',
                    "values": "90 90 90 110 110 110 110 95x10",
                },
                {
                    "series": 'ocpp_lc_balancing_measured_draw_amperes{instance="lc:8080",job="ocpp-lc",phase="L2"}',
                    "values": "90x20",
                },
                {
                    "series": 'ocpp_lc_balancing_grid_limit_amperes{instance="lc:8080",job="ocpp-lc",phase="L1"}',
                    "values": "100x20",
                },
                {
                    "series": 'ocpp_lc_balancing_grid_limit_amperes{instance="lc:8080",job="ocpp-lc",phase="L2"}',
                    "values": "100x20",
                },
                # An EVSE is found overdrawing at minute 3, and complies again at minute 6 (issue 11.3).
                {
                    "series": 'ocpp_lc_balancing_overdrawing_evses{instance="lc:8080",job="ocpp-lc"}',
                    "values": "0 0 0 1 1 1 0x14",
                },
                # After a restart at minute 0, two EVSEs never confirm their limit again (issue 11.2).
                {
                    "series": 'ocpp_lc_balancing_unconfirmed_since_restart_evses{instance="lc:8080",job="ocpp-lc"}',
                    "values": "40 12 2x30",
                },
                # The grid meter stops answering at minute 3 (its node falls back a poll later) and is
                # back at minute 8; a feeder meter fails one read in two from minute 2.
                {
                    "series": 'ocpp_lc_meter_fallback{instance="lc:8080",job="ocpp-lc",meter="grid-main"}',
                    "values": "0 0 0 1 1 1 1 1 0x12",
                },
                {
                    "series": 'ocpp_lc_meter_readings_total{instance="lc:8080",job="ocpp-lc",meter="feeder",'
                    'outcome="ok"}',
                    "values": "0+60x2 120+30x30",
                },
                {
                    "series": 'ocpp_lc_meter_readings_total{instance="lc:8080",job="ocpp-lc",meter="feeder",'
                    'outcome="timeout"}',
                    "values": "0 0 0+30x30",
                },
                # MQTT (issue 16): the broker is lost from minute 2 to minute 9; the EMS sends a payload that is
                # not JSON at minute 4, and nothing wrong after that.
                {
                    "series": 'ocpp_lc_mqtt_connected{instance="lc:8080",job="ocpp-lc"}',
                    "values": "1 1 0 0 0 0 0 0 0 1x22",
                },
                {
                    "series": 'ocpp_lc_mqtt_messages_total{instance="lc:8080",job="ocpp-lc",outcome="not_json"}',
                    "values": "0 0 0 0 1x26",
                },
                {
                    "series": 'ocpp_lc_mqtt_messages_total{instance="lc:8080",job="ocpp-lc",outcome="applied"}',
                    "values": "0+1x30",
                },
                # Site autonomy (issue 12): the CSMS goes at minute 1 and stays away; max_offline_s is 20 min.
                {
                    "series": 'ocpp_lc_autonomy_offline_longest_seconds{instance="lc:8080",job="ocpp-lc"}',
                    "values": "0 0 60+60x30",
                },
                {
                    "series": 'ocpp_lc_autonomy_max_offline_seconds{instance="lc:8080",job="ocpp-lc"}',
                    "values": "1200x32",
                },
                # The queue for the CSMS fills: one station passes 80% of its bound at minute 9, all
                # stations together 80% of the bytes at minute 17.
                {"series": 'ocpp_lc_autonomy_queue_bytes{instance="lc:8080",job="ocpp-lc"}', "values": "0+500x30"},
                {
                    "series": 'ocpp_lc_autonomy_queue_limit_bytes{instance="lc:8080",job="ocpp-lc"}',
                    "values": "10000x30",
                },
                {
                    "series": 'ocpp_lc_autonomy_queue_fullest_station_messages{instance="lc:8080",job="ocpp-lc"}',
                    "values": "0+100x30",
                },
                {
                    "series": 'ocpp_lc_autonomy_queue_limit_messages_per_station{instance="lc:8080",job="ocpp-lc"}',
                    "values": "1000x30",
                },
                # Station messages refused for want of room from minute 6 to minute 10.
                {
                    "series": 'ocpp_lc_autonomy_local_answers_total{instance="lc:8080",job="ocpp-lc",'
                    'kept="queue_full"}',
                    "values": "0x5 3+3x5 18x20",
                },
                {
                    "series": 'ocpp_lc_autonomy_local_answers_total{instance="lc:8080",job="ocpp-lc",kept="queued"}',
                    "values": "0+50x30",
                },
                # A station rejects profiles from minute 4.
                {
                    "series": 'ocpp_lc_balancing_profiles_total{instance="lc:8080",job="ocpp-lc",kind="increase",'
                    'outcome="rejected"}',
                    "values": "0 0 0 0 1x16",
                },
            ],
            "alert_rule_test": [
                # Over the limit for 1 minute is the rollout catching up; for 2 minutes it is an alert.
                {"eval_time": "4m", "alertname": "OcppLcSiteOverLimit", "exp_alerts": []},
                {
                    "eval_time": "5m",
                    "alertname": "OcppLcSiteOverLimit",
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "page", "instance": "lc:8080", "job": "ocpp-lc", "phase": "L1"},
                            "exp_annotations": {"summary": "Site draw on L1 is above its limit on lc:8080"},
                        }
                    ],
                },
                {"eval_time": "9m", "alertname": "OcppLcSiteOverLimit", "exp_alerts": []},
                {"eval_time": "2m", "alertname": "OcppLcStationOverdrawing", "exp_alerts": []},
                {
                    "eval_time": "4m",
                    "alertname": "OcppLcStationOverdrawing",
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "page", "instance": "lc:8080", "job": "ocpp-lc"},
                            "exp_annotations": {
                                "summary": "1 EVSEs draw more than their charging profile allows on lc:8080"
                            },
                        }
                    ],
                },
                {"eval_time": "7m", "alertname": "OcppLcStationOverdrawing", "exp_alerts": []},
                # Fewer than 15 minutes of a stale belief is stations reconnecting after the restart.
                {"eval_time": "10m", "alertname": "OcppLcBeliefsStaleAfterRestart", "exp_alerts": []},
                {
                    "eval_time": "20m",
                    "alertname": "OcppLcBeliefsStaleAfterRestart",
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "warning", "instance": "lc:8080", "job": "ocpp-lc"},
                            "exp_annotations": {
                                "summary": "2 EVSEs have not confirmed their limit since ocpp-lc restarted on lc:8080"
                            },
                        }
                    ],
                },
                {"eval_time": "3m", "alertname": "OcppLcProfilesRejected", "exp_alerts": []},
                {
                    "eval_time": "5m",
                    "alertname": "OcppLcProfilesRejected",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "instance": "lc:8080",
                                "job": "ocpp-lc",
                                "outcome": "rejected",
                            },
                            "exp_annotations": {"summary": "Stations rejected charging profiles on lc:8080"},
                        }
                    ],
                },
                # Down for 4 minutes: not yet (5 minutes are allowed for a reconnect).
                {"eval_time": "6m", "alertname": "OcppLcCsmsLinkDown", "exp_alerts": []},
                {
                    "eval_time": "8m",
                    "alertname": "OcppLcCsmsLinkDown",
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "page", "instance": "lc:8080", "job": "ocpp-lc"},
                            "exp_annotations": {
                                "summary": "ocpp-lc on lc:8080 has had no connection of its own to the CSMS "
                                "for 5 minutes",
                            },
                        }
                    ],
                },
                {"eval_time": "5m", "alertname": "OcppLcStationsDropping", "exp_alerts": []},
                {
                    "eval_time": "10m",
                    "alertname": "OcppLcStationsDropping",
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "warning", "instance": "lc:8080", "job": "ocpp-lc"},
                            "exp_annotations": {"summary": "12 station connections ended in 10 minutes on lc:8080"},
                        }
                    ],
                },
                # Minute 25: the drops are over 10 minutes old; the 50 shutdown closes at minute 11 are not drops.
                {"eval_time": "25m", "alertname": "OcppLcStationsDropping", "exp_alerts": []},
                # In fallback for 2 minutes is an alert; back to valid readings, it clears.
                {"eval_time": "4m", "alertname": "OcppLcMeterFallback", "exp_alerts": []},
                {
                    "eval_time": "5m",
                    "alertname": "OcppLcMeterFallback",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "instance": "lc:8080",
                                "job": "ocpp-lc",
                                "meter": "grid-main",
                            },
                            "exp_annotations": {"summary": "Meter grid-main gives no valid readings on lc:8080"},
                        }
                    ],
                },
                {"eval_time": "9m", "alertname": "OcppLcMeterFallback", "exp_alerts": []},
                {"eval_time": "8m", "alertname": "OcppLcMeterReadingsFailing", "exp_alerts": []},
                {
                    "eval_time": "25m",
                    "alertname": "OcppLcMeterReadingsFailing",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "instance": "lc:8080",
                                "job": "ocpp-lc",
                                "meter": "feeder",
                            },
                            "exp_annotations": {
                                "summary": "More than a fifth of meter feeder's readings fail on lc:8080"
                            },
                        }
                    ],
                },
                # Five minutes without the broker is an alert; connected again, it clears.
                {"eval_time": "6m", "alertname": "OcppLcMqttDisconnected", "exp_alerts": []},
                {
                    "eval_time": "7m",
                    "alertname": "OcppLcMqttDisconnected",
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "warning", "instance": "lc:8080", "job": "ocpp-lc"},
                            "exp_annotations": {
                                "summary": "ocpp-lc on lc:8080 has not been connected to its MQTT broker for 5 minutes"
                            },
                        }
                    ],
                },
                {"eval_time": "10m", "alertname": "OcppLcMqttDisconnected", "exp_alerts": []},
                # A refused payload alerts for 15 minutes; applied ones never do.
                {"eval_time": "3m", "alertname": "OcppLcMqttLimitsRefused", "exp_alerts": []},
                {
                    "eval_time": "5m",
                    "alertname": "OcppLcMqttLimitsRefused",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "instance": "lc:8080",
                                "job": "ocpp-lc",
                                "outcome": "not_json",
                            },
                            "exp_annotations": {"summary": "EMS limits over MQTT refused on lc:8080 (not_json)"},
                        }
                    ],
                },
                {"eval_time": "25m", "alertname": "OcppLcMqttLimitsRefused", "exp_alerts": []},
                # Autonomous for 15 minutes is an alert (minute 17: 16 minutes); close to max_offline_s a page.
                {"eval_time": "16m", "alertname": "OcppLcSiteAutonomous", "exp_alerts": []},
                {
                    "eval_time": "17m",
                    "alertname": "OcppLcSiteAutonomous",
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "warning", "instance": "lc:8080", "job": "ocpp-lc"},
                            "exp_annotations": {
                                "summary": "Stations on lc:8080 have been served without their CSMS for 16m 0s"
                            },
                        }
                    ],
                },
                {"eval_time": "17m", "alertname": "OcppLcAutonomyEndingSoon", "exp_alerts": []},
                {
                    "eval_time": "18m",
                    "alertname": "OcppLcAutonomyEndingSoon",
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "page", "instance": "lc:8080", "job": "ocpp-lc"},
                            "exp_annotations": {"summary": "Stations on lc:8080 are close to the end of site autonomy"},
                        }
                    ],
                },
                {"eval_time": "8m", "alertname": "OcppLcAutonomyQueueNearlyFull", "exp_alerts": []},
                {
                    "eval_time": "9m",
                    "alertname": "OcppLcAutonomyQueueNearlyFull",
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "page", "instance": "lc:8080", "job": "ocpp-lc"},
                            "exp_annotations": {"summary": "The queue for the CSMS on lc:8080 is 90% full"},
                        }
                    ],
                },
                {
                    "eval_time": "17m",
                    "alertname": "OcppLcAutonomyQueueNearlyFull",
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "page", "instance": "lc:8080", "job": "ocpp-lc"},
                            "exp_annotations": {"summary": "The queue for the CSMS on lc:8080 is 85% full"},
                        }
                    ],
                },
                {"eval_time": "5m", "alertname": "OcppLcAutonomyMessagesRefused", "exp_alerts": []},
                {
                    "eval_time": "8m",
                    "alertname": "OcppLcAutonomyMessagesRefused",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "instance": "lc:8080",
                                "job": "ocpp-lc",
                                "kept": "queue_full",
                            },
                            "exp_annotations": {
                                "summary": "Station messages were refused (queue_full) during the outage on lc:8080"
                            },
                        }
                    ],
                },
                # Minute 25: the refusals are over 10 minutes old; messages queued are not refusals.
                {"eval_time": "25m", "alertname": "OcppLcAutonomyMessagesRefused", "exp_alerts": []},
                {"eval_time": "2m", "alertname": "OcppLcFirmwarePublishFailed", "exp_alerts": []},
                {
                    "eval_time": "5m",
                    "alertname": "OcppLcFirmwarePublishFailed",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "instance": "lc:8080",
                                "job": "ocpp-lc",
                                "outcome": "invalid_checksum",
                            },
                            "exp_annotations": {"summary": "A firmware publish failed (invalid_checksum) on lc:8080"},
                        }
                    ],
                },
            ],
        }
    ],
}


async def test_alerts_fire_when_they_should_and_not_before(tmp_path: Path) -> None:
    promtool = tool("promtool")
    # promtool compares annotations in full: the summaries are written out above (their templates
    # filled in), the descriptions (plain text) come from the file.
    descriptions = {name: alert["description"] for name, alert in read_rules().items()}
    cases = json.loads(json.dumps(RULE_TESTS))
    for case in cases["tests"][0]["alert_rule_test"]:
        for alert in case["exp_alerts"]:
            alert["exp_annotations"]["description"] = descriptions[case["alertname"]]
    tests = tmp_path / "rules-test.yml"
    tests.write_text(json.dumps(cases | {"rule_files": [str(RULES)]}, indent=2))
    status, report = await run_tool(promtool, "test", "rules", tests)
    assert status == 0, report


def test_dashboard_takes_its_datasource_as_a_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert [item["name"] for item in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        # A hard-coded datasource uid would show "datasource not found" on every other Grafana.
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            # One site per dashboard: every query is narrowed to the chosen controller.
            assert 'instance=~"$instance"' in target["expr"], panel["title"]
    titles = " ".join(panel["title"] for panel in panels)
    for needed in ("Stations connected", "Own link", "Boot status", "Outbox", "Frames per second", "p99", "Firmware"):
        assert needed in titles
    # Site autonomy (issue 12): its row shows stations local and replaying, the queue, the replay and
    # the local authorisations, each panel on the metric it names.
    rows = [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"]
    assert "Site autonomy (CSMS unreachable)" in rows
    autonomy_exprs = {
        panel["title"]: " ".join(target["expr"] for target in panel["targets"])
        for panel in panels
        if "ocpp_lc_autonomy_" in " ".join(target["expr"] for target in panel["targets"])
    }
    for title, metric in (
        ("Served locally", 'ocpp_lc_autonomy_stations{instance=~"$instance", mode="local"}'),
        ("Replaying", 'ocpp_lc_autonomy_stations{instance=~"$instance", mode="replaying"}'),
        ("Queue for the CSMS", "ocpp_lc_autonomy_queue_bytes"),
        ("Queue used", "ocpp_lc_autonomy_queue_limit_bytes"),
        ("Replay", "ocpp_lc_autonomy_replay_duration_seconds_bucket"),
        ("Local authorisations", "ocpp_lc_autonomy_local_authorizations_total"),
    ):
        assert metric in autonomy_exprs[title], title


#: Grafana's variables, as Grafana would fill them in, so that Prometheus's parser can read the queries.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "30s", "$instance": ".*"}


async def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = tool("promtool")
    queries = [
        expression
        for expression in dashboard_expressions(json.loads(DASHBOARD.read_text()))
        if METRIC_NAME.search(expression) and not expression.startswith("label_values(")
    ]
    assert len(queries) >= 25
    rules = []
    for index, query in enumerate(queries):
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        assert "$" not in query, query
        rules.append({"record": f"dashboard:query_{index}", "expr": query})
    # promtool parses each query as a recording rule's expression and names any that does not parse.
    checked = tmp_path / "dashboard-queries.yml"
    checked.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    status, report = await run_tool(promtool, "check", "rules", checked)
    assert status == 0, report


async def test_every_metric_in_rules_and_dashboard_exists_on_a_running_controller(lab: Lab, csms: FakeCsms) -> None:
    used: dict[str, set[str]] = {}
    # The annotations count too: they send the operator to other metrics.
    for alert in read_rules().values():
        for text in alert.values():
            for name in METRIC_NAME.findall(text):
                used.setdefault(name, set()).add(RULES.name)
    dashboard = json.loads(DASHBOARD.read_text())
    for expression in dashboard_expressions(dashboard):
        for name in METRIC_NAME.findall(expression):
            used.setdefault(name, set()).add(DASHBOARD.name)
    assert len(rule_expressions()) >= 10
    assert len(used) >= 20, used

    # With its own connection on, as deployed: the own identity's and the firmware cache's metrics
    # exist only then.
    # A meter (nobody listens on port 1: it is polled and fails, which is all its metrics need).
    meters = [{"name": "grid-main", "host": "127.0.0.1", "port": 1}]
    # An MQTT broker likewise (port 1: the attempts fail, the MQTT metrics exist all the same).
    mqtt = {"host": "127.0.0.1", "port": 1}
    app = await lab.start_app(
        csms.url, controller={"connect": True}, site={"grid": {"max_current_amperes": 100}}, meters=meters, mqtt=mqtt
    )
    with trio.fail_after(IO_TIMEOUT_S):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}", trust_env=False) as client:
            response = await client.get("/metrics")
    assert response.status_code == 200
    exported: set[str] = set()
    for line in response.text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            exported.add(name)
            if kind == "histogram":
                exported.update(name + suffix for suffix in HISTOGRAM_SUFFIXES)
        elif line and not line.startswith("#"):
            exported.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    missing = {name: sorted(files) for name, files in used.items() if name not in exported}
    assert not missing, f"named in the deploy kit but not on /metrics: {missing}"


# ---------------------------------------------------------------------------------------------------
# The systemd unit
# ---------------------------------------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line.strip() and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def unit_with_stub_executable(tmp_path: Path) -> Path:
    """The unit with its ExecStart binary replaced by an executable stub in ``tmp_path``.

    systemd-analyze checks that the binary exists, and /opt/ocpp-lc is not installed on a test machine;
    only that path is changed.
    """
    stub = tmp_path / "ocpp-lc"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    (exec_start,) = unit_settings()["ExecStart"]
    binary = exec_start.split()[0]
    assert text.count(f"ExecStart={binary} ") == 1
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(f"ExecStart={binary} ", f"ExecStart={stub} "))
    return unit


async def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    systemd_analyze = tool("systemd-analyze")
    status, report = await run_tool(systemd_analyze, "verify", unit_with_stub_executable(tmp_path), cwd=tmp_path)
    assert status == 0, report
    # systemd warns about an unknown key or an unparsable value and goes on ("ignoring"), exit status 0.
    assert report.strip() == "", report


async def test_systemd_rates_the_unit_hardened(tmp_path: Path) -> None:
    systemd_analyze = tool("systemd-analyze")
    status, report = await run_tool(
        systemd_analyze, "security", "--offline=yes", "--no-pager", unit_with_stub_executable(tmp_path), cwd=tmp_path
    )
    if status != 0 and "--offline" in report:
        pytest.skip(f"this systemd-analyze cannot assess a unit file offline: {report.strip()}")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", report)
    assert match is not None, report
    # systemd's scale: 0 (locked down) to 10 (unprotected); a default service scores 9.6 "UNSAFE".
    assert float(match.group(1)) < 2.0, report


def test_unit_runs_the_controller_as_systemd_expects() -> None:
    settings = unit_settings()
    assert settings["Type"] == ["notify"]
    assert settings["DynamicUser"] == ["yes"]
    assert settings["StateDirectory"] == ["ocpp-lc"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["CapabilityBoundingSet"] == [""]
    # The watchdog is fed every WatchdogSec/2 (router/systemd.py).
    assert re.fullmatch(r"\d+s", settings["WatchdogSec"][0])
    # The state directory systemd creates is the one the controller uses by default.
    defaults = parse_settings({})
    assert str(defaults.state.path) == "/var/lib/" + settings["StateDirectory"][0]
    # Two sockets per station at the largest site the default configuration admits, and some to spare.
    assert int(settings["LimitNOFILE"][0]) >= 2 * defaults.stations.max_stations + 1024
    # The config file the unit names lives in the directory systemd provides for it.
    (exec_start,) = settings["ExecStart"]
    assert exec_start.endswith(f"run --config /etc/{settings['ConfigurationDirectory'][0]}/ocpp-lc.toml")
    # A configuration problem (2) or a damaged state store (3) is not retried in a loop (router/cli.py).
    assert settings["RestartPreventExitStatus"] == ["2 3"]


# ---------------------------------------------------------------------------------------------------
# The container file (no container runtime runs here: read it, and run its health check for real)
# ---------------------------------------------------------------------------------------------------


def containerfile_instruction(name: str) -> str:
    text = CONTAINERFILE.read_text().replace("\\\n", " ")
    values = [line.split(None, 1)[1] for line in text.splitlines() if line.startswith(f"{name} ")]
    assert values, name
    return values[-1]


def test_container_is_slim_and_does_not_run_as_root() -> None:
    bases = [line.split()[1] for line in CONTAINERFILE.read_text().splitlines() if line.startswith("FROM ")]
    assert bases and all(base == "python:3.11-slim" for base in bases)
    user = containerfile_instruction("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert json.loads(containerfile_instruction("ENTRYPOINT")) == [
        "ocpp-lc",
        "run",
        "--config",
        "/etc/ocpp-lc/ocpp-lc.toml",
    ]
    assert containerfile_instruction("VOLUME") == str(parse_settings({}).state.path)
    # The exposed ports are the example configuration's.
    example = EXAMPLE_CONFIG.read_text()
    exposed = containerfile_instruction("EXPOSE").split()
    for port in exposed:
        assert re.search(rf'^listen = "[^"]+:{port}"$', example, re.MULTILINE), port


async def test_container_health_check_asks_a_running_controller(lab: Lab, csms: FakeCsms) -> None:
    healthcheck = containerfile_instruction("HEALTHCHECK")
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "python"  # the slim image has no curl
    app = await lab.start_app(csms.url)
    # The container's controller listens on 8080; this one on whatever port 0 gave.
    script = command[-1].replace("127.0.0.1:8080", f"127.0.0.1:{app.http_port}")
    assert script != command[-1]
    status, report = await run_tool(sys.executable, *command[1:-1], script)
    assert status == 0, report
    # Against a port where nothing answers, the same check fails (and the container turns unhealthy).
    app.request_shutdown()
    with trio.fail_after(IO_TIMEOUT_S):
        await app.stopped.wait()
    status, report = await run_tool(sys.executable, *command[1:-1], script)
    assert status != 0
    assert "Connection refused" in report, report
