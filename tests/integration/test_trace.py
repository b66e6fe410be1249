"""``GET /api/v1/trace/{identity}`` and ``ocpp-lc trace``: one station's frames live, both directions, timed.

The whole appliance runs in-process on port 0 between the fake CSMS and a raw station. The stream is
read over real HTTP on loopback, with httpx in-process (for the NDJSON lines and the server's side of
things) and with the CLI in a subprocess (for what a user reads and the exit code a script sees).
"""

from __future__ import annotations

import datetime
import itertools
import json
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from router.app import App
from router.http import build_http_app, serve_http
from router.metrics import RouterMetrics
from router.observers import ObserverHub
from router.trace_api import TraceApi
from tests.integration.conftest import BOOT_REQUEST, IO_TIMEOUT_S, OCPP201, FakeCsms, Lab, call
from tests.support.schemas import validate_frames

TOKEN = "trace-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Safety net only: the CLI tests wait for the CLI's output and its exit, never for a time. A Python
#: start-up with typer, httpx and pydantic takes about a second, many more on a busy machine.
CLI_TIMEOUT_S = 120.0
#: Safety net for the test that pushes 20 MB through the relay (a second or two on a busy machine).
BULK_TIMEOUT_S = 120.0
#: Nothing listens on the discard port of loopback.
UNREACHABLE_URL = "http://127.0.0.1:9"
#: ``ocpp-lc`` as a terminal starts it. A process started in the background by a non-interactive shell
#: (``pytest … &``, a CI step) inherits SIGINT *ignored*, and Python then installs no KeyboardInterrupt
#: handler, so Ctrl-C (SIGINT) would do nothing and the test would wait for ever. A terminal's
#: foreground job has SIGINT at its default: the first process puts it back and execs the console
#: script's entry point, which then sees exactly what it sees under a terminal.
CLI = (
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, '-c', 'from router.cli import main; main()', *sys.argv[1:]])",
)


def url_of(app: App) -> str:
    return f"http://127.0.0.1:{app.http_port}"


def client_for(app: App) -> httpx.AsyncClient:
    # trust_env=False: a proxy in the environment must not stand between the test and the appliance.
    return httpx.AsyncClient(base_url=url_of(app), trust_env=False, timeout=httpx.Timeout(IO_TIMEOUT_S, read=None))


async def documents(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """The NDJSON documents of a trace, keep-alive (empty) lines skipped.

    Keep the iterator referenced while the stream is meant to stay open: once collected, its
    finalizer closes httpx's line iterator and with it the response's connection.
    """
    async for line in lines:
        if line:
            document = json.loads(line)
            assert isinstance(document, dict)
            yield document


async def settled() -> None:
    """Return once every task of this run waits for something outside it.

    The hub has no notification for a subscriber leaving. A client's close is on the server's socket
    as soon as it returns (loopback), and trio polls for it before calling the run idle, so once idle,
    hypercorn has read the end of the connection and the trace has ended with its subscription.
    """
    await trio.testing.wait_all_tasks_blocked()


async def test_frames_of_both_directions_stream_in_order_with_exact_text_and_timing(lab: Lab, csms: FakeCsms) -> None:
    app = await lab.start_app(csms.url, http={"token": TOKEN})
    with trio.fail_after(IO_TIMEOUT_S):
        async with client_for(app) as client, client.stream("GET", "/api/v1/trace/CP-1", headers=AUTH) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/x-ndjson"
            trace = documents(response.aiter_lines())
            hello = await anext(trace)
            # Tracing a station that is not connected yet is allowed: the trace waits for it.
            assert (hello["trace"], hello["connected"]) == ("CP-1", False)

            station = await lab.station(app, "CP-1")
            other = await lab.station(app, "CP-2")
            await call(other, "BootNotification", BOOT_REQUEST)  # not this trace's station
            boot_reply = await call(station, "BootNotification", BOOT_REQUEST)
            heartbeat_reply = await call(station, "Heartbeat", {})
            connected = await anext(trace)
            frames = [await anext(trace) for _ in range(4)]
            await station.aclose(1000, "bye")
            disconnected = await anext(trace)

    assert (connected["event"], connected["subprotocol"]) == ("connected", OCPP201)
    assert [frame["direction"] for frame in frames] == ["station->csms", "csms->station"] * 2
    # Exactly the text that travelled: what the CSMS received, and what the station received.
    boot_call, heartbeat_call = csms.of("CP-1")[0].frames
    assert [frame["frame"] for frame in frames] == [
        boot_call,
        json.dumps(boot_reply),
        heartbeat_call,
        json.dumps(heartbeat_reply),
    ]
    validate_frames(frame["frame"] for frame in frames)
    times = [datetime.datetime.fromisoformat(document["t"]) for document in (hello, connected, *frames)]
    assert times == sorted(times)
    assert frames[0]["dt_s"] == 0.0  # the first frame of the trace
    for earlier, later in itertools.pairwise(times[2:]):
        assert 0.0 <= (later - earlier).total_seconds() <= IO_TIMEOUT_S
    assert all(frame["dt_s"] >= 0.0 for frame in frames)
    assert (disconnected["event"], disconnected["reason"]) == ("disconnected", "station_closed")


async def test_a_trace_of_a_connected_station_says_so_first(lab: Lab, csms: FakeCsms) -> None:
    app = await lab.start_app(csms.url)  # no token: the API is open on loopback, like /metrics
    station = await lab.station(app, "CP 3", path="/ocpp/CP%203")
    with trio.fail_after(IO_TIMEOUT_S):
        await call(station, "Heartbeat", {})
        async with client_for(app) as client, client.stream("GET", "/api/v1/trace/CP%203") as response:
            trace = documents(response.aiter_lines())
            hello = await anext(trace)
            await call(station, "Heartbeat", {})
            frame = await anext(trace)

    assert (hello["trace"], hello["connected"]) == ("CP 3", True)
    assert frame["direction"] == "station->csms"
    assert json.loads(frame["frame"])[2] == "Heartbeat"


async def test_a_trace_that_falls_behind_loses_frames_says_how_many_and_never_slows_relaying(
    lab: Lab, csms: FakeCsms
) -> None:
    # A queue of 4 observations per subscriber; each relayed frame brings two (raw and parsed).
    app = await lab.start_app(csms.url, http={"token": TOKEN}, routing={"observer_queue": 4})
    big = {"vendorId": "org.example", "data": "x" * 500_000}
    burst = 20
    with trio.fail_after(BULK_TIMEOUT_S):
        async with client_for(app) as client, client.stream("GET", "/api/v1/trace/CP-1", headers=AUTH) as response:
            trace = documents(response.aiter_lines())
            await anext(trace)
            # The test reads nothing while 20 MB of frames pass: the socket fills, the trace's queue
            # fills, and every call is still relayed and answered.
            station = await lab.station(app, "CP-1")
            for _ in range(burst):
                reply = await call(station, "DataTransfer", big)
                assert reply[0] == 3
            seen: list[dict[str, Any]] = []
            while not any("dropped" in document for document in seen):
                seen.append(await anext(trace))
            heartbeat = await call(station, "Heartbeat", {})
            while seen[-1].get("frame") != json.dumps(heartbeat):
                seen.append(await anext(trace))

    assert len(csms.of("CP-1")[0].frames) == burst + 1
    [dropped] = [document["dropped"] for document in seen if "dropped" in document]
    frames = [document for document in seen if "frame" in document]
    # Everything published to this trace was either sent or counted as lost (the parsed observations
    # that travel with the frames are counted too, and the trace skips them when it does get them).
    assert 0 < dropped < 4 * burst
    assert len(frames) < 2 * burst
    # Once the trace caught up, nothing is lost: the next call and its answer are both there.
    assert frames[-2]["direction"] == "station->csms"
    assert json.loads(frames[-2]["frame"])[2] == "Heartbeat"


async def test_a_silent_trace_sends_empty_keepalive_lines() -> None:
    # The trace route alone on the real HTTP face, with a keep-alive short enough to wait for.
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    hub = ObserverHub(metrics)
    api = TraceApi(hub, metrics, registry, token=None, connected=lambda station_id: False, keepalive_s=0.05)
    http_app = build_http_app(registry, lambda: (True, {}), api.routes())
    with trio.fail_after(IO_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_http, http_app, "127.0.0.1", 0)
            async with (
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client,
                client.stream("GET", "/api/v1/trace/CP-1") as response,
            ):
                lines = response.aiter_lines()
                hello = json.loads(await anext(lines))
                silence = [await anext(lines), await anext(lines)]
                open_during = registry.get_sample_value("ocpp_lc_traces_open")
            nursery.cancel_scope.cancel()

    assert (hello["trace"], hello["connected"]) == ("CP-1", False)
    assert silence == ["", ""]
    assert open_during == 1.0


async def test_missing_or_wrong_token_is_refused_401(lab: Lab, csms: FakeCsms) -> None:
    app = await lab.start_app(csms.url, http={"token": TOKEN})
    with trio.fail_after(IO_TIMEOUT_S):
        async with client_for(app) as client:
            missing = await client.get("/api/v1/trace/CP-1")
            wrong = await client.get("/api/v1/trace/CP-1", headers={"Authorization": "Bearer not-the-token-01234"})

    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json() == {"error": "missing or wrong bearer token"}
    assert not app.hub.wants_raw  # no trace subscription was made


async def test_subscription_is_released_when_the_client_leaves_and_traces_are_capped(lab: Lab, csms: FakeCsms) -> None:
    app = await lab.start_app(csms.url, http={"token": TOKEN})
    station = await lab.station(app, "CP-1")
    with trio.fail_after(IO_TIMEOUT_S):
        async with client_for(app) as client:
            async with client.stream("GET", "/api/v1/trace/CP-1", headers=AUTH) as response:
                first = documents(response.aiter_lines())
                await anext(first)
                assert app.hub.wants_raw
            # The client closed its connection: the trace's subscription goes with it, and with the
            # last trace gone the pumps stop building raw frames.
            await settled()
            assert not app.hub.wants_raw
            await call(station, "Heartbeat", {})  # relaying goes on without the trace

            # At most 8 at once; the ninth is told why, and a slot freed is usable again.
            async with trio.open_nursery() as nursery:
                opened = trio.Semaphore(0)
                leave = trio.Event()

                async def hold_trace() -> None:
                    async with client.stream("GET", "/api/v1/trace/CP-1", headers=AUTH) as held:
                        # Kept referenced: a collected line iterator would close the response early.
                        trace = documents(held.aiter_lines())
                        await anext(trace)
                        opened.release()
                        await leave.wait()

                for _ in range(8):
                    nursery.start_soon(hold_trace)
                for _ in range(8):
                    await opened.acquire()
                ninth = await client.get("/api/v1/trace/CP-1", headers=AUTH)
                leave.set()
            await settled()
            assert not app.hub.wants_raw
            async with client.stream("GET", "/api/v1/trace/CP-1", headers=AUTH) as again:
                last = documents(again.aiter_lines())
                hello = await anext(last)

    assert ninth.status_code == 429
    assert "too many traces open (8)" in ninth.json()["error"]
    assert hello["connected"] is True


async def test_an_identity_no_station_can_have_is_refused(lab: Lab, csms: FakeCsms) -> None:
    app = await lab.start_app(csms.url)
    with trio.fail_after(IO_TIMEOUT_S):
        async with client_for(app) as client:
            response = await client.get("/api/v1/trace/" + "x" * 49)

    assert response.status_code == 404
    assert "no station can have this identity" in response.json()["error"]


# -- the CLI ------------------------------------------------------------------------------------------


class Cli:
    """``ocpp-lc ARGS`` running in a subprocess, its stdout read line by line."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = b""

    async def line(self) -> str:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            data = await self.process.stdout.receive_some()
            assert data, f"the CLI's stdout ended; so far: {self._buffer!r}"
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    async def ended(self) -> tuple[int, str]:
        """Exit code and stderr, once the process has ended."""
        assert self.process.stderr is not None
        stderr = b""
        async for data in self.process.stderr:
            stderr += data
        return await self.process.wait(), stderr.decode()


async def start_cli(*args: str) -> Cli:
    process = await trio.lowlevel.open_process(
        [*CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    return Cli(process)


FRAME_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \+\d+\.\d{3}s (station->csms|csms->station) (\[.*\])$")


async def test_cli_prints_frames_readably_and_exits_1_when_the_controller_goes_away(lab: Lab, csms: FakeCsms) -> None:
    app = await lab.start_app(csms.url, http={"token": TOKEN})
    with trio.fail_after(CLI_TIMEOUT_S):
        cli = await start_cli("trace", "CP-1", "--url", url_of(app), "--token", TOKEN)
        try:
            hello = await cli.line()
            station = await lab.station(app, "CP-1")
            reply = await call(station, "Heartbeat", {})
            lines = [await cli.line() for _ in range(3)]
            app.request_shutdown()
            code, err = await cli.ended()
        finally:
            cli.process.kill()

    assert "tracing CP-1 (not connected now: waiting for it)" in hello
    assert lines[0].endswith(f"-- connected ({OCPP201})")
    sent, answered = (FRAME_LINE.match(line) for line in lines[1:])
    assert sent is not None and answered is not None, lines
    assert (sent[1], json.loads(sent[2])[2]) == ("station->csms", "Heartbeat")
    assert (answered[1], answered[2]) == ("csms->station", json.dumps(reply))
    assert code == 1
    assert f"the controller at {url_of(app)} ended the trace" in err


async def test_cli_json_passes_lines_through_and_ctrl_c_exits_0(lab: Lab, csms: FakeCsms) -> None:
    app = await lab.start_app(csms.url, http={"token": TOKEN})
    station = await lab.station(app, "CP-1")
    with trio.fail_after(CLI_TIMEOUT_S):
        await call(station, "Heartbeat", {})
        cli = await start_cli("trace", "CP-1", "--json", "--url", url_of(app), "--token", TOKEN)
        try:
            hello = json.loads(await cli.line())
            await call(station, "Heartbeat", {})
            frame = json.loads(await cli.line())
            cli.process.send_signal(signal.SIGINT)
            code, err = await cli.ended()
        finally:
            cli.process.kill()

    assert (hello["trace"], hello["connected"]) == ("CP-1", True)
    assert frame["direction"] == "station->csms"
    assert json.loads(frame["frame"])[2] == "Heartbeat"
    assert (code, err) == (0, "")


async def test_cli_wrong_token_exits_4_and_unreachable_exits_1(lab: Lab, csms: FakeCsms) -> None:
    app = await lab.start_app(csms.url, http={"token": TOKEN})
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}

    async def run(name: str, url: str, *args: str) -> None:
        results[name] = await trio.run_process(
            [*CLI, "trace", "CP-1", "--url", url, *args], capture_stdout=True, capture_stderr=True, check=False
        )

    with trio.fail_after(CLI_TIMEOUT_S):
        # Side by side: each is a Python start-up of about a second.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "wrong", url_of(app), "--token", "not-the-token-0123456789")
            nursery.start_soon(run, "unreachable", UNREACHABLE_URL, "--token", TOKEN)

    wrong, unreachable = results["wrong"], results["unreachable"]
    assert (wrong.returncode, wrong.stdout) == (4, b"")
    assert b"wrong or missing token" in wrong.stderr
    assert (unreachable.returncode, unreachable.stdout) == (1, b"")
    assert f"controller unreachable at {UNREACHABLE_URL}".encode() in unreachable.stderr
