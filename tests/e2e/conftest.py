"""End-to-end fixtures: the whole appliance in-process, between independent peers in subprocesses.

A test gets a factory, `open_relay(*csms_args, **settings_overrides)`, that starts the CSMS peer (`tests/peers/csms.py`,
the PyPI `ocpp` library on `websockets`) on a free port, then the appliance with `run_app` on port 0
pointed at it (state in the test's `tmp_path`, the controller's own connection off), and yields a
:class:`Relay`. Stations are started against the appliance with
`relay.station(identity, *station_args)`. On exit everything is stopped in reverse order: stations
first (their own clean close), then the appliance (graceful shutdown), then the CSMS.

Peers are real processes, so these tests run on the real clock; every wait is bounded by the test's
own `trio.fail_after`, and the teardown here by its own deadline.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from router.app import App, run_app
from router.config import parse_settings
from tests.support.peers import Peer, open_csms, open_station, open_station16

#: The base path stations use and the CSMS is told to accept (anything else gets 404 from it).
OCPP_PATH = "/ocpp"

#: Generous bound for starting or stopping the appliance on a loaded two-core machine.
APP_START_STOP_S = 10.0

#: How long the appliance waits for pairs to close on shutdown; stations have usually gone already.
SHUTDOWN_GRACE_S = 1.0


@dataclass
class Relay:
    """A running appliance between a CSMS peer and whatever stations a test starts."""

    app: App
    csms: Peer
    csms_port: int

    @property
    def station_url(self) -> str:
        """Where stations connect; the peer appends `/<percent-encoded identity>`."""
        return f"ws://127.0.0.1:{self.app.station_port}{OCPP_PATH}"

    def station(self, identity: str, *args: str) -> AbstractAsyncContextManager[Peer]:
        """Start a station peer against the appliance (yielded at once; wait for its events)."""
        return open_station(self.station_url, identity, *args)

    def station16(self, identity: str, *args: str) -> AbstractAsyncContextManager[Peer]:
        """Start an OCPP 1.6J station peer (`tests/peers/station16.py`) against the appliance."""
        return open_station16(self.station_url, identity, *args)

    def metric(self, name: str, **labels: str) -> float:
        """A sample of the appliance's registry; 0 when the labelled child was never touched."""
        value = self.app.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


OpenRelay = Callable[..., AbstractAsyncContextManager[Relay]]


@asynccontextmanager
async def _open_relay(state_dir: Path, *csms_args: str, **overrides: Any) -> AsyncIterator[Relay]:
    async with open_csms("--path-prefix", OCPP_PATH, *csms_args) as (csms, csms_port):
        sections: dict[str, Any] = {
            # Relaying alone: the controller's own identity is tested with it in test_appliance.py.
            "controller": {"connect": False},
            "stations": {"listen": "127.0.0.1:0", "path": OCPP_PATH},
            "csms": {"url": f"ws://127.0.0.1:{csms_port}{OCPP_PATH}", "connect_timeout_s": 5.0},
            "routing": {"shutdown_grace_s": SHUTDOWN_GRACE_S},
            "http": {"listen": "127.0.0.1:0"},
            "state": {"dir": str(state_dir)},
        }
        for section, values in overrides.items():
            # An array of tables ([[meters]]) is taken as it is.
            sections[section] = values if isinstance(values, list) else {**sections.get(section, {}), **values}
        settings = parse_settings(sections)
        try:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(APP_START_STOP_S):
                    app: App = await nursery.start(run_app, settings)
                try:
                    yield Relay(app, csms, csms_port)
                finally:
                    app.request_shutdown()
                    with trio.CancelScope(shield=True), trio.move_on_after(APP_START_STOP_S):
                        await app.stopped.wait()
                    # Should the graceful path hang, the test still ends (and fails on what it asserted).
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The nursery wraps what the test body raised; a lone assertion reads better unwrapped.
            if len(group.exceptions) != 1 or isinstance(group.exceptions[0], BaseExceptionGroup):
                raise
            error = group.exceptions[0]
            chain = error.__cause__, error.__context__, error.__suppress_context__
            try:
                raise error
            finally:
                # Keep the error's own chaining, not a pointer to the group we dropped.
                error.__cause__, error.__context__, error.__suppress_context__ = chain


@pytest.fixture
def open_relay(tmp_path: Path) -> OpenRelay:
    """`async with open_relay(*csms_args, **{section: {key: value}}) as relay:` (see the module docstring).

    Keyword arguments override settings per section, e.g. `routing={"lc_call_timeout_s": 5}`; the
    controller's own connection is off unless `controller={"connect": True}`. Each relay keeps its
    state in its own directory under the test's `tmp_path`.
    """
    relays = itertools.count()

    def open_relay(*csms_args: str, **overrides: Any) -> AbstractAsyncContextManager[Relay]:
        return _open_relay(tmp_path / f"state-{next(relays)}", *csms_args, **overrides)

    return open_relay
