"""What Prometheus scrapes after real traffic: a valid exposition with bounded labels (Done-when 7)."""

from __future__ import annotations

import json
import shutil
import uuid

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from router.ocppj import ACTIONS
from router.transport import HandshakeFailed
from tests.integration.conftest import BOOT_REQUEST, IO_TIMEOUT_S, FakeCsms, Lab, call
from tests.support.schemas import validate_call, validate_result

GET_VARIABLES = {
    "getVariableData": [{"component": {"name": "OCPPCommCtrlr"}, "variable": {"name": "HeartbeatInterval"}}]
}
GET_VARIABLES_RESULT = {
    "getVariableResult": [
        {
            "attributeStatus": "Accepted",
            "attributeValue": "300",
            "component": {"name": "OCPPCommCtrlr"},
            "variable": {"name": "HeartbeatInterval"},
        }
    ]
}

#: Every family an operator's dashboards and alerts are built on, as named in the exposition.
EXPECTED_FAMILIES = {
    "ocpp_lc_stations_connected": "gauge",
    "ocpp_lc_upstream_links_up": "gauge",
    "ocpp_lc_frames_total": "counter",
    "ocpp_lc_call_duration_seconds": "histogram",
    "ocpp_lc_handshake_refusals_total": "counter",
    "ocpp_lc_pair_closes_total": "counter",
    "ocpp_lc_lc_calls_total": "counter",
    "ocpp_lc_invalid_frames_total": "counter",
}


async def test_metrics_after_traffic_pass_promtool_and_keep_action_labels_bounded(lab: Lab, csms: FakeCsms) -> None:
    bogus_action = f"Bogus{uuid.uuid4().hex[:12]}"
    app = await lab.start_app(csms.url)
    with trio.fail_after(IO_TIMEOUT_S):
        # A station boots through the controller.
        station = await lab.station(app, "CS01")
        boot = await call(station, "BootNotification", BOOT_REQUEST)
        assert boot[2]["status"] == "Accepted"

        # The controller's own call, answered by the station (what the controller writes is checked
        # against the OCA schema).
        link = app.links.get("CS01")
        assert link is not None
        async with trio.open_nursery() as nursery:

            async def answer_as_station() -> None:
                message = json.loads(await station.receive_text())
                assert message[0] == 2
                validate_call(message[2], message[3])
                validate_result(message[2], GET_VARIABLES_RESULT)
                await station.send_text(json.dumps([3, message[1], GET_VARIABLES_RESULT]))

            nursery.start_soon(answer_as_station)
            assert await link.call("GetVariables", GET_VARIABLES) == GET_VARIABLES_RESULT

        # An action OCPP 2.0.1 does not know, an invalid frame, and a refused handshake.
        assert (await call(station, bogus_action, {}))[0] == 3
        await station.send_text("this is not JSON")
        assert json.loads(await station.receive_text())[1] == "-1"
        with pytest.raises(HandshakeFailed):
            await lab.station(app, "X" * 49)

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}", trust_env=False) as client:
            response = await client.get("/metrics")
    assert response.status_code == 200
    body = response.text

    families = {family.name: family for family in text_string_to_metric_families(body)}
    for name, kind in EXPECTED_FAMILIES.items():
        assert f"# TYPE {name} {kind}\n" in body, name
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families.values()
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted(labels.items()))))

    assert value("ocpp_lc_stations_connected") == 1
    assert value("ocpp_lc_upstream_links_up") == 1
    assert value("ocpp_lc_frames_total", direction="station_to_csms", action="BootNotification") == 1
    assert value("ocpp_lc_frames_total", direction="csms_to_station", action="BootNotification") == 1
    assert value("ocpp_lc_frames_total", direction="lc_to_station", action="GetVariables") == 1
    assert value("ocpp_lc_frames_total", direction="station_to_lc", action="GetVariables") == 1
    # The bogus call and its answer, and the invalid frame and the CSMS's error: all under "other".
    assert value("ocpp_lc_frames_total", direction="station_to_csms", action="other") == 2
    assert value("ocpp_lc_frames_total", direction="csms_to_station", action="other") == 2
    assert value("ocpp_lc_call_duration_seconds_count", leg="csms", action="BootNotification") == 1
    assert value("ocpp_lc_lc_calls_total", action="GetVariables", outcome="result") == 1
    assert value("ocpp_lc_handshake_refusals_total", reason="identity") == 1
    assert value("ocpp_lc_invalid_frames_total", direction="station_to_csms", kind="json") == 1

    # Label values stay bounded whatever stations send: OCPP 2.0.1 action names or "other".
    action_values = {
        sample.labels["action"]
        for family in families.values()
        for sample in family.samples
        if "action" in sample.labels
    }
    assert action_values <= ACTIONS | {"other"}
    assert "other" in action_values
    assert bogus_action not in body

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus')")
    with trio.fail_after(IO_TIMEOUT_S):
        checked = await trio.run_process(
            [promtool, "check", "metrics"],
            stdin=response.content,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    report = (checked.stdout + checked.stderr).decode()
    assert checked.returncode == 0, report
    assert report.strip() == "", report  # promtool prints lint findings even when it exits 0
