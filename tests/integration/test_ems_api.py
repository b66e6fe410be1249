"""The EMS API (K14) over real HTTP on loopback, against the whole appliance: auth, bad input, round trips.

Every request goes through ``run_app`` with its real store, so "the limit survives a restart" means a new
appliance on the same state directory, and "the limit is unchanged" is read back over HTTP.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry

from router.app import App, run_app
from tests.integration.conftest import IO_TIMEOUT_S, settings_for

TOKEN = "ems-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Nothing listens here: the controller's own connection is off and no station connects.
CSMS_URL = "ws://127.0.0.1:9/ocpp"


@asynccontextmanager
async def appliance(state_dir: Path, **ems: Any) -> AsyncIterator[tuple[App, httpx.AsyncClient]]:
    """Run the appliance on port 0 with a token and yield it with an HTTP client; stop it on exit."""
    settings = settings_for(CSMS_URL, state_dir=state_dir, http={"token": TOKEN}, ems=ems)
    async with trio.open_nursery() as nursery:
        app: App = await nursery.start(run_app, settings, CollectorRegistry())
        try:
            # trust_env=False: a proxy configured in the environment must not intercept loopback tests.
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}", trust_env=False) as client:
                yield app, client
        finally:
            app.request_shutdown()
            await app.stopped.wait()


def sample(app: App, name: str, **labels: str) -> float | None:
    return app.registry.get_sample_value(name, labels)


async def test_set_read_and_release_round_trip(tmp_path: Path) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with appliance(tmp_path) as (app, client):
            put = await client.put(
                "/api/v1/limits/pv", json={"unit": "A", "limit": 80, "valid_for_s": 600}, headers=AUTH
            )
            read = await client.get("/api/v1/limits", headers=AUTH)
            metrics_text = (await client.get("/metrics")).text
            released = await client.delete("/api/v1/limits/pv", headers=AUTH)
            after = await client.get("/api/v1/limits", headers=AUTH)
            again = await client.delete("/api/v1/limits/pv", headers=AUTH)
            allocations = await client.get("/api/v1/allocations", headers=AUTH)

    assert put.status_code == 200, put.text
    assert put.json()["limit_now"] == 80.0
    assert put.json()["stale"] is False
    status = read.json()
    assert status["phases"] == {name: {"limit_amperes": 80.0, "source": "ems:pv"} for name in ("L1", "L2", "L3")}
    assert status["failsafe_active"] is False
    [source] = status["sources"]
    assert (source["source"], source["unit"], source["stale"]) == ("pv", "A", False)
    assert 0 <= source["age_s"] < IO_TIMEOUT_S
    assert 'ocpp_lc_site_limit_amperes{phase="L2",source="ems:pv"} 80.0' in metrics_text
    assert 'ocpp_lc_ems_limit_stale{source="pv"} 0.0' in metrics_text
    assert released.status_code == 200
    assert after.json()["phases"]["L1"] == {"limit_amperes": None, "source": None}
    assert after.json()["sources"] == []
    assert again.status_code == 404
    assert allocations.status_code == 200
    # No station is connected: the balancing loop runs but has nothing to allocate.
    assert allocations.json()["allocations"] == []
    assert sample(app, "ocpp_lc_ems_api_requests_total", operation="set", outcome="ok") == 1
    assert sample(app, "ocpp_lc_ems_api_requests_total", operation="release", outcome="not_found") == 1


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/limits"),
        ("PUT", "/api/v1/limits/pv"),
        ("DELETE", "/api/v1/limits/pv"),
        ("GET", "/api/v1/allocations"),
    ],
)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token-0123456789", f"Basic {TOKEN}", "Bearer"])
async def test_a_missing_or_wrong_token_is_refused(
    tmp_path: Path, method: str, path: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    with trio.fail_after(IO_TIMEOUT_S):
        async with appliance(tmp_path) as (app, client):
            await client.put("/api/v1/limits/pv", json={"unit": "A", "limit": 80}, headers=AUTH)
            response = await client.request(method, path, json={"unit": "A", "limit": 1}, headers=headers)
            status = (await client.get("/api/v1/limits", headers=AUTH)).json()

    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json() == {"error": "missing or wrong bearer token"}
    assert status["phases"]["L1"] == {"limit_amperes": 80.0, "source": "ems:pv"}
    assert (
        sample(app, "ocpp_lc_ems_api_requests_total", operation=_operation(method, path), outcome="unauthorized") == 1
    )


def _operation(method: str, path: str) -> str:
    if path.endswith("allocations"):
        return "read_allocations"
    return {"GET": "read_limits", "PUT": "set", "DELETE": "release"}[method]


BAD_REQUESTS: list[tuple[str, bytes, str]] = [
    ("malformed JSON", b'{"unit": "A", "limit": ', "body"),
    ("not an object", b"80", "body"),
    ("negative", b'{"unit": "A", "limit": -5}', "limit"),
    ("NaN", b'{"unit": "A", "limit": NaN}', "limit"),
    ("infinite", b'{"unit": "A", "limit": 1e999}', "limit"),
    ("above the configured maximum", b'{"unit": "A", "limit": 250.5}', "limit"),
    ("watts above the maximum", b'{"unit": "W", "limit": 172501}', "limit"),
    ("unknown unit", b'{"unit": "kW", "limit": 11}', "unit"),
    ("unknown field", b'{"unit": "A", "limit": 11, "limit_kw": 3}', "limit_kw"),
    (
        "schedule out of order",
        json.dumps(
            {"unit": "A", "periods": [{"start_offset_s": 0, "limit": 50}, {"start_offset_s": 0, "limit": 40}]}
        ).encode(),
        "periods.1.start_offset_s",
    ),
    (
        "schedule not starting at 0",
        json.dumps({"unit": "A", "periods": [{"start_offset_s": 5, "limit": 50}]}).encode(),
        "periods.0.start_offset_s",
    ),
    ("validity in the past", b'{"unit": "A", "limit": 50, "valid_until": "2020-01-01T00:00:00Z"}', "valid_until"),
    ("validity not a date", b'{"unit": "A", "limit": 50, "valid_until": "tomorrow"}', "valid_until"),
    ("validity negative", b'{"unit": "A", "limit": 50, "valid_for_s": -1}', "valid_for_s"),
]


async def test_bad_input_is_refused_per_field_and_the_limit_in_force_is_unchanged(tmp_path: Path) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with appliance(tmp_path, max_current_amperes=250) as (app, client):
            await client.put("/api/v1/limits/pv", json={"unit": "A", "limit": 80, "valid_for_s": 3600}, headers=AUTH)
            before = (await client.get("/api/v1/limits", headers=AUTH)).json()
            answers = []
            for reason, raw, _ in BAD_REQUESTS:
                headers = {**AUTH, "Content-Type": "application/json"}
                answers.append((reason, await client.put("/api/v1/limits/pv", content=raw, headers=headers)))
            bad_name = await client.put("/api/v1/limits/no%20spaces", json={"unit": "A", "limit": 1}, headers=AUTH)
            after = (await client.get("/api/v1/limits", headers=AUTH)).json()

    for (reason, _, field), (_, response) in zip(BAD_REQUESTS, answers, strict=True):
        assert response.status_code == 422, (reason, response.text)
        fields = response.json()["fields"]
        assert fields.get(field), (reason, fields)
    assert bad_name.status_code == 422
    assert "source" in bad_name.json()["fields"]
    # The limit in force, its received time and its validity: all as before (age moves on, nothing else).
    for status in (before, after):
        status.pop("at")
        status["sources"][0].pop("age_s")
    assert after == before
    count = sample(app, "ocpp_lc_ems_api_requests_total", operation="set", outcome="invalid")
    assert count == len(BAD_REQUESTS) + 1


async def test_a_stale_limit_shows_the_failsafe_in_the_api_and_the_metrics(tmp_path: Path) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with appliance(tmp_path, failsafe_current_amperes=16) as (_, client):
            put = await client.put(
                "/api/v1/limits/pv", json={"unit": "A", "limit": 80, "valid_for_s": 0.2}, headers=AUTH
            )
            # The validity is wall-clock time on the appliance: wait it out (the pure engine's test
            # runs the same on trio's virtual clock, tests/unit/test_limits.py).
            await trio.sleep(0.3)
            status = (await client.get("/api/v1/limits", headers=AUTH)).json()
            metrics_text = (await client.get("/metrics")).text

    assert put.status_code == 200
    assert status["failsafe_active"] is True
    assert status["phases"]["L3"] == {"limit_amperes": 16.0, "source": "failsafe:pv"}
    assert status["sources"][0]["stale"] is True
    assert status["sources"][0]["limit_now"] is None
    assert 'ocpp_lc_site_limit_amperes{phase="L1",source="failsafe:pv"} 16.0' in metrics_text
    assert 'ocpp_lc_ems_limit_stale{source="pv"} 1.0' in metrics_text
    assert "ocpp_lc_ems_failsafe_active 1.0" in metrics_text


async def test_a_limit_survives_a_restart_of_the_appliance(tmp_path: Path) -> None:
    schedule = {
        "unit": "W",
        "periods": [{"start_offset_s": 0, "limit": 40_000}, {"start_offset_s": 900, "limit": 20_000}],
        "valid_for_s": 3600,
    }
    with trio.fail_after(IO_TIMEOUT_S):
        async with appliance(tmp_path) as (_, client):
            put = await client.put("/api/v1/limits/tariff", json=schedule, headers=AUTH)
            before = (await client.get("/api/v1/limits", headers=AUTH)).json()
        async with appliance(tmp_path) as (_, client):
            after = (await client.get("/api/v1/limits", headers=AUTH)).json()

    assert put.status_code == 200
    assert after["power"] == {"limit_watts": 40_000.0, "source": "ems:tariff"}
    for status in (before, after):
        status.pop("at")
        status["sources"][0].pop("age_s")
    assert after == before
