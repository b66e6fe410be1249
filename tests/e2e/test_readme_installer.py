"""The README's "For installers" section, followed to the letter: the docs cannot drift from the product.

The test reads README.md itself: the first ```toml block of the section is the configuration, the
```sh block that follows holds the commands, and the "point each station's CSMS URL at the
controller" sentence says where stations connect. It writes the configuration as shown, changing
only the keys in `SUBSTITUTED_KEYS` (each must be in the README block, so removing one fails here
loudly), runs both commands as shown from the directory holding the file, and then lets an
independent station (the PyPI `ocpp` library) connect where the README says and charge once,
against an independent CSMS (the same library) standing where the README's CSMS URL points.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from tests.support.frames import relayed
from tests.support.peers import REPO_ROOT, open_csms, open_station
from tests.support.schemas import validate_call, validate_frames

README = REPO_ROOT / "README.md"

#: The README section this test follows, up to its first subsection.
SECTION_HEADING = "## For installers"

#: What the test changes in the README's configuration, and why. Nothing else is touched: the file it
#: runs must parse to the README's own configuration with just these values replaced.
SUBSTITUTED_KEYS = (
    # Loopback only, and port 0: tests bind no fixed port (others run in parallel on this machine);
    # the controller's "up:" log line says which ports it got.
    ("stations", "listen"),
    # The CSMS host and port become the CSMS peer's; the README's path is kept, the peer insists on it.
    ("csms", "url"),
    ("http", "listen"),
    # /var/lib/ocpp-lc is not ours to write.
    ("state", "dir"),
)

#: The station identity the README's example uses.
STATION_ID = "CS01"

#: Basic-auth password of the station (security profile 1); the README says it reaches the CSMS unchanged.
STATION_PASSWORD = "s3cret-CS01"

#: The whole walk-through: three Python processes and a controller on a loaded two-core machine; a
#: pass takes a few seconds, mostly process start-up.
TIMEOUT_S = 25

#: The controller's log line that says it serves, with the ports it bound.
UP_LINE = re.compile(rb" up: stations on port (\d+), HTTP on port (\d+)")


@dataclass(frozen=True)
class InstallerSection:
    """What the README tells an installer, as read from the README."""

    config_text: str
    commands: list[list[str]]
    #: Where the example station connected before (the CSMS) and where it connects now (the controller).
    station_url_before: str
    station_url_after: str


def read_installer_section() -> InstallerSection:
    text = README.read_text(encoding="utf-8")
    assert f"\n{SECTION_HEADING}\n" in text, f"README.md has no {SECTION_HEADING!r} section"
    section = text.split(f"\n{SECTION_HEADING}\n", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"^```(\w*)[^\n]*\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)
    config_index = next((i for i, (lang, _) in enumerate(blocks) if lang == "toml"), None)
    assert config_index is not None, f"no ```toml configuration block under {SECTION_HEADING!r}"
    config_text = blocks[config_index][1]
    shell = next((body for lang, body in blocks[config_index + 1 :] if lang == "sh" and "ocpp-lc run" in body), None)
    assert shell is not None, f"no ```sh block with `ocpp-lc run` after the configuration under {SECTION_HEADING!r}"
    commands = [shlex.split(line, comments=True) for line in shell.splitlines()]
    moved = re.search(r"connected to `(ws://[^`]+)` now connects to\s+`(ws://[^`]+)`", section)
    assert moved is not None, "the sentence telling installers where stations now connect is gone"
    return InstallerSection(config_text, [argv for argv in commands if argv], moved.group(1), moved.group(2))


def substitute(config_text: str, values: dict[tuple[str, str], str]) -> str:
    """The README's configuration text with the values of `values`' keys replaced, line by line."""
    shown = tomllib.loads(config_text)
    assert set(values) == set(SUBSTITUTED_KEYS)
    for section, key in SUBSTITUTED_KEYS:
        old = shown.get(section, {}).get(key)
        assert isinstance(old, str), f"the README's configuration has no [{section}] {key}; update this test"
        line = re.compile(rf"^({re.escape(key)}\s*=\s*){re.escape(json.dumps(old))}", flags=re.MULTILINE)
        matches = list(line.finditer(config_text))
        assert len(matches) == 1, f"[{section}] {key} = {old!r} is not on a line of its own in the README"
        (match,) = matches
        # json.dumps quotes a plain string the way TOML's basic strings want.
        quoted = match.group(1) + json.dumps(values[section, key])
        config_text = config_text[: match.start()] + quoted + config_text[match.end() :]
    expected = {name: dict(table) for name, table in shown.items()}
    for (section, key), value in values.items():
        expected[section][key] = value
    assert tomllib.loads(config_text) == expected, "the substitution changed more than it should"
    return config_text


def ocpp_lc() -> list[str]:
    """The `ocpp-lc` console script installed beside this interpreter (as `pip install` puts it)."""
    script = Path(sys.executable).parent / "ocpp-lc"
    if script.exists():
        return [str(script)]
    # Not installed as a package (e.g. run from a checkout on PYTHONPATH): the script's own entry point.
    return [sys.executable, "-c", "from router.entry import main; main()"]


def now() -> str:
    """The current time as an OCPP timestamp (RFC 3339, UTC, milliseconds)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def one_charging_session() -> list[tuple[str, dict[str, Any]]]:
    """What a station sends for one session: boot, plug-in, start, stop, unplug (Part 2 B01, E01–E07)."""
    token = {"idToken": "04A1B2C3D4", "type": "ISO14443"}
    transaction = {"transactionId": "tx-readme-1"}
    return [
        ("BootNotification", {"chargingStation": {"model": "Wallbox", "vendorName": "ACME"}, "reason": "PowerUp"}),
        ("StatusNotification", {"timestamp": now(), "connectorStatus": "Occupied", "evseId": 1, "connectorId": 1}),
        (
            "TransactionEvent",
            {
                "eventType": "Started",
                "timestamp": now(),
                "triggerReason": "Authorized",
                "seqNo": 0,
                "transactionInfo": {**transaction, "chargingState": "Charging"},
                "idToken": token,
                "evse": {"id": 1, "connectorId": 1},
                "meterValue": [{"timestamp": now(), "sampledValue": [{"value": 0.0}]}],
            },
        ),
        (
            "TransactionEvent",
            {
                "eventType": "Ended",
                "timestamp": now(),
                "triggerReason": "StopAuthorized",
                "seqNo": 1,
                "transactionInfo": {**transaction, "chargingState": "Idle", "stoppedReason": "Local"},
                "idToken": token,
                "meterValue": [{"timestamp": now(), "sampledValue": [{"value": 7431.0}]}],
            },
        ),
        ("StatusNotification", {"timestamp": now(), "connectorStatus": "Available", "evseId": 1, "connectorId": 1}),
    ]


async def _refused(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:`port` any more."""
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return True
    await stream.aclose()
    return False


async def test_the_installer_section_runs_as_written_and_a_station_charges_through_it(tmp_path: Path) -> None:
    readme = read_installer_section()
    shown = tomllib.loads(readme.config_text)
    identity = shown["controller"]["identity"]
    csms_path = urlsplit(shown["csms"]["url"]).path
    # The README agrees with itself: the station's old URL is the CSMS URL plus its identity, and its
    # new one is the controller's [stations] port and path plus its identity.
    assert readme.station_url_before == f"{shown['csms']['url']}/{STATION_ID}"
    after = urlsplit(readme.station_url_after)
    assert after.port == int(shown["stations"]["listen"].rsplit(":", 1)[1])
    assert after.path == f"{shown['stations']['path']}/{STATION_ID}"

    check_argv, run_argv = (
        next(argv for argv in readme.commands if argv[:2] == ["ocpp-lc", verb]) for verb in ("check-config", "run")
    )
    config_name = run_argv[run_argv.index("--config") + 1]
    assert check_argv[2:] == [config_name], "check the file that is run"
    session = one_charging_session()
    for action, payload in session:
        validate_call(action, payload)  # the test's own messages must be beyond reproach

    async with open_csms("--path-prefix", csms_path) as (csms, csms_port):
        config = substitute(
            readme.config_text,
            {
                ("stations", "listen"): "127.0.0.1:0",
                ("csms", "url"): f"ws://127.0.0.1:{csms_port}{csms_path}",
                ("http", "listen"): "127.0.0.1:0",
                ("state", "dir"): str(tmp_path / "state"),
            },
        )
        (tmp_path / config_name).write_text(config, encoding="utf-8")
        # Not under a service manager here, whatever the environment running the tests says.
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}

        with trio.fail_after(TIMEOUT_S):
            checked = await trio.run_process(
                [*ocpp_lc(), *check_argv[1:]],
                cwd=tmp_path,
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert checked.returncode == 0, checked.stderr.decode()
            assert b"OK" in checked.stdout

            log = bytearray()
            async with trio.open_nursery() as nursery:
                controller: trio.Process = await nursery.start(
                    partial(
                        trio.run_process,
                        [*ocpp_lc(), *run_argv[1:]],
                        cwd=tmp_path,
                        env=env,
                        stderr=subprocess.PIPE,
                        check=False,
                    )
                )
                assert controller.stderr is not None
                while (up := UP_LINE.search(log)) is None:
                    chunk = await controller.stderr.receive_some()
                    assert chunk, f"the controller exited before serving:\n{log.decode()}"
                    log += chunk
                station_port, http_port = int(up.group(1)), int(up.group(2))
                nursery.start_soon(_collect, controller.stderr, log)

                async with httpx.AsyncClient(trust_env=False) as client:
                    health = await client.get(f"http://127.0.0.1:{http_port}/healthz")
                assert health.status_code == 200, health.text
                assert health.json()["station_port"] == station_port
                # The controller is a station of its own at the CSMS, under the README's identity.
                own_boot = await csms.wait_for_event("request", identity=identity, action="BootNotification")
                assert own_boot["payload"]["chargingStation"]

                station_url = readme.station_url_after.replace("<controller>", "127.0.0.1", 1).replace(
                    f":{after.port}/", f":{station_port}/", 1
                )
                base_url, station_id = station_url.rsplit("/", 1)
                assert station_id == STATION_ID
                async with open_station(
                    base_url, STATION_ID, "--no-boot", "--basic-auth-password", STATION_PASSWORD
                ) as station:
                    assert (await station.wait_for_event("connected"))["subprotocol"] == "ocpp2.0.1"
                    upstream = await csms.wait_for_event("connected", identity=STATION_ID)
                    assert upstream["path"] == urlsplit(readme.station_url_before).path
                    credentials = base64.b64encode(f"{STATION_ID}:{STATION_PASSWORD}".encode()).decode()
                    assert upstream["authorization"] == f"Basic {credentials}", "Basic auth passes through unchanged"

                    replies: list[dict[str, Any]] = []
                    for action, payload in session:
                        reply = await station.call(action=action, payload=payload)
                        assert reply["event"] == "result", reply
                        replies.append(reply["payload"])
                        await csms.wait_for_event("request", identity=STATION_ID, action=action, payload=payload)
                    assert replies[0]["status"] == "Accepted"
                    assert replies[2] == {"idTokenInfo": {"status": "Accepted"}}, "the CSMS's verdict on the token"

                    # The README's "until SIGINT/SIGTERM", and exit code 0 for a clean stop.
                    controller.send_signal(signal.SIGTERM)
                    closed = await station.wait_for_event("disconnected")
                    assert closed["code"] == 1001, closed  # going away (Part 4 §6.3)
                await controller.wait()
            assert controller.returncode == 0, log.decode()
            await csms.wait_for_event("disconnected", identity=STATION_ID)
            await csms.wait_for_event("disconnected", identity=identity)
            assert await _refused(station_port), "the station port still listens after the controller exited"
            assert await _refused(http_port), "the HTTP port still listens after the controller exited"

    # The CSMS cannot tell the controller is there (Part 4 §6.1): the same frames, in the same order.
    assert csms.frames(STATION_ID, "in") == relayed(station.frames(direction="out"))
    assert csms.frames(STATION_ID, "out") == relayed(station.frames(direction="in"))
    calls = [json.loads(frame) for frame in csms.frames(STATION_ID, "in")]
    assert [(frame[2], frame[3]) for frame in calls if frame[0] == 2] == session
    # Everything the controller wrote, to the station and as itself to the CSMS, is valid OCPP 2.0.1.
    validate_frames(station.frames())
    validate_frames(csms.frames(STATION_ID))
    validate_frames(csms.frames(identity))
    assert "Traceback" not in log.decode()


async def _collect(stream: trio.abc.ReceiveStream, log: bytearray) -> None:
    """Keep reading the controller's log (a full pipe would stall it), for the failure messages."""
    while chunk := await stream.receive_some():
        log += chunk
