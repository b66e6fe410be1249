"""The ``ocpp-lc`` command.

Exit codes (also in ``ocpp-lc run --help``):

* 0: stopped on request (SIGINT/SIGTERM), or ``check-config`` found nothing wrong;
* 1: the appliance failed while running (e.g. a port already in use);
* 2: a configuration problem (the message names the file, the key and what is allowed);
* 3: the state store cannot be used (the message names the file and what to do about it).

The commands that talk to a running controller over its HTTP face (``status``, ``limit set``,
``limit clear``) exit 0 when it answered, 1 when it cannot be reached (the message names the URL),
2 for a configuration problem, 3 when the controller refused the request (a limit it judged invalid,
or a source with no limit to clear; the reasons are printed) and 4 when the token is wrong or missing.
``trace`` runs until Ctrl-C (exit 0) and exits 1 when the controller goes away during the trace.

Restart: when the CSMS resets the controller (Reset on its own identity, B11/B12), the appliance shuts
down gracefully, closing every station with 1001, and ``run`` starts it again in the same process, with
the same configuration and state directory; stations reconnect on their own. The service manager sees
one process throughout, so a restart never counts as a failure there.
"""

from __future__ import annotations

import datetime
import json
import logging
import signal
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn, TypeVar
from urllib.parse import quote

import httpx
import trio
import typer

from meters.status import node_lines
from meters.status import status_lines as meter_status_lines
from mqtt.status import status_lines as mqtt_status_lines

from .config import ConfigError, Settings, load_settings
from .store import Store, StoreError
from .systemd import SystemdNotifier

if TYPE_CHECKING:
    from .app import App

EXIT_RUNTIME = 1
EXIT_CONFIG = 2
EXIT_STATE = 3
#: Commands talking to a running controller: it refused the request (e.g. an invalid limit).
EXIT_REFUSED = 3
#: Commands talking to a running controller: the bearer token is wrong or missing.
EXIT_UNAUTHORIZED = 4
#: ``balancing release``: some station's profiles could not be cleared.
EXIT_INCOMPLETE = 5

EXIT_CODES_HELP = (
    "Exit codes: 0 stopped on request; 1 failed while running (e.g. a port in use); "
    "2 configuration problem; 3 state store unusable (damaged, locked by another ocpp-lc, or not writable)."
)

E = TypeVar("E", bound=BaseException)

cli = typer.Typer(
    name="ocpp-lc",
    help="OCPP 2.0.1 Local Controller: relays charging stations to a CSMS, balances site power, "
    "publishes firmware on the site network.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

log = logging.getLogger("ocpp_lc.cli")

LogFormat = Literal["text", "json"]


def _load(config: Path) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(EXIT_CONFIG) from None


def _open_store(settings: Settings, *, recover: bool) -> Store:
    """Open the state store before trio starts, so that a problem with it is reported plainly (exit 3)."""
    try:
        return Store.open(settings.state.path, recover=recover)
    except StoreError as error:
        _state_problem(error)


def _state_problem(error: StoreError) -> NoReturn:
    # The message names the file and the way out (StoreDamaged says --recover-state); no traceback.
    typer.echo(f"ocpp-lc: cannot use the state: {error}", err=True)
    raise typer.Exit(EXIT_STATE)


def _find(error: BaseException, kind: type[E]) -> E | None:
    """The first ``kind`` in ``error`` or, nested, in its exception groups (trio's nurseries wrap)."""
    if isinstance(error, kind):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            if (found := _find(inner, kind)) is not None:
                return found
    return None


async def serve_until_signalled(settings: Settings, store: Store | None = None) -> str | None:
    """Run the appliance; the first SIGINT/SIGTERM shuts down gracefully, a second one at once.

    Returns the restart reason when the appliance stopped to restart itself (a Reset from the CSMS),
    None when it was stopped by a signal.
    """
    from .app import run_app

    # Under systemd (Type=notify): READY=1 once the ports listen, the watchdog fed from this loop, STOPPING=1
    # or RELOADING=1 when the appliance goes down. Elsewhere (no NOTIFY_SOCKET) all of it does nothing.
    systemd = SystemdNotifier.from_environment()
    async with trio.open_nursery() as nursery:
        app: App = await nursery.start(partial(run_app, settings, store=store))
        systemd.ready(f"serving: stations on port {app.station_port}, HTTP on port {app.http_port}")
        # systemd watches from READY=1 on; pings from this loop stop when the loop is blocked.
        nursery.start_soon(systemd.feed_watchdog)
        # However the appliance ends (a signal, a Reset), the signal watcher below ends with it.
        nursery.start_soon(_stop_watch, app, nursery, systemd)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if app.stopped.is_set():
                    break
                if not app.shutting_down:
                    log.info("%s received: shutting down gracefully", signal.Signals(signum).name)
                    systemd.stopping(f"shutting down: closing {len(app.links)} station connections")
                    app.request_shutdown()
                else:
                    log.warning("second signal: stopping now")
                    app.restart_reason = None  # a signal during a restart means: stop, do not start again
                    nursery.cancel_scope.cancel()
                    break
    return app.restart_reason


async def _stop_watch(app: App, nursery: trio.Nursery, systemd: SystemdNotifier) -> None:
    await app.stopped.wait()
    if app.restart_reason is not None:
        # `run` starts the appliance again in this process; the next READY=1 ends the reload.
        systemd.reloading(f"restarting after {app.restart_reason}")
    nursery.cancel_scope.cancel()


@cli.command(epilog=EXIT_CODES_HELP)
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="The controller's TOML configuration file.")],
    log_format: Annotated[
        str | None, typer.Option("--log-format", help="'text' (default) or 'json' lines; overrides \\[log] format.")
    ] = None,
    recover_state: Annotated[
        bool,
        typer.Option(
            "--recover-state",
            help="If the state store is damaged, move it aside (state.sqlite3.damaged-<time>) and start with "
            "empty state. A sound store is left as it is.",
        ),
    ] = False,
) -> None:
    """Run the controller with a configuration file until SIGINT/SIGTERM.

    A Reset from the CSMS restarts the appliance in this process, with the same configuration and state.

    Stations reconnect on their own.
    """
    from .logs import setup_logging

    settings = _load(config)
    fmt: LogFormat = "json" if (log_format or settings.log.format) == "json" else "text"
    setup_logging(settings.log.level, fmt)
    recover = recover_state
    while True:
        store = _open_store(settings, recover=recover)
        recover = False  # only what was damaged at the first start is moved aside
        try:
            with store:
                reason = trio.run(serve_until_signalled, settings, store)
        except Exception as error:
            if (state_error := _find(error, StoreError)) is not None:
                _state_problem(state_error)
            if (os_error := _find(error, OSError)) is not None:
                log.error("cannot start: %s", os_error)
                raise typer.Exit(EXIT_RUNTIME) from None
            raise
        if reason is None:
            return
        log.warning(
            "restarting the appliance after %s: same configuration, state in %s; stations reconnect on their own",
            reason,
            settings.state.path,
        )


@cli.command("check-config")
def check_config(
    config: Annotated[Path, typer.Argument(help="The TOML configuration file to check.")],
) -> None:
    """Check a configuration file and explain every problem in plain words."""
    settings = _load(config)
    own = "" if settings.controller.connect else " (own connection off)"
    typer.echo(
        f"{config}: OK — identity {settings.controller.identity}{own}, stations on {settings.stations.listen}"
        f"{settings.stations.path}/<identity>, CSMS {settings.csms.url}, HTTP on {settings.http.listen}, "
        f"state in {settings.state.dir}"
    )


@cli.command()
def demo(
    stations: Annotated[int, typer.Option(help="How many simulated stations.", min=1, max=200)] = 12,
    duration_s: Annotated[
        float, typer.Option("--duration", help="Stop after this many seconds (0: until Ctrl-C).", min=0)
    ] = 0,
    plain: Annotated[bool, typer.Option(help="Print events line by line instead of a live view.")] = False,
) -> None:
    """Show the controller on loopback: a sandbox CSMS, simulated stations balanced under a site limit an EMS
    lowers and releases, and a firmware publish."""
    from .demo import run_demo

    raise typer.Exit(run_demo(stations=stations, duration_s=duration_s, plain=plain))


CLIENT_EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 controller unreachable; 2 configuration problem; 3 refused by the controller "
    "(the reasons are printed); 4 unauthorized (wrong or missing token)."
)
#: A controller on this machine answers at once; waiting longer only delays telling the user it is down.
CLIENT_TIMEOUT_S = 10.0

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="The controller's TOML configuration file: the URL and token default from \\[http]."
    ),
]
UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url", help="The controller's HTTP face (default: from \\[http] listen, else http://127.0.0.1:8080)."
    ),
]
TokenOption = Annotated[str | None, typer.Option("--token", help="Bearer token (default: \\[http] token).")]


def _endpoint(config: Path | None, url: str | None, token: str | None) -> tuple[str, str | None]:
    """The base URL and token: the options first, then the configuration's [http] section."""
    if config is not None:
        http = _load(config).http
        if url is None:
            address = http.address
            # A wildcard listen address is reached on loopback from this machine.
            host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(address.host, address.host)
            url = f"http://[{host}]:{address.port}" if ":" in host else f"http://{host}:{address.port}"
        if token is None:
            token = http.token_value()
    return (url or "http://127.0.0.1:8080").rstrip("/"), token


def _request(method: str, url: str, token: str | None, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    """One request to the controller; exits 1 when it cannot be reached and 4 when the token is refused."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        # trust_env=False: a proxy in the environment must not stand between this and a local controller.
        with httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT_S, trust_env=False) as client:
            response = client.request(method, path, json=body, headers=headers)
    except httpx.HTTPError as error:
        typer.echo(f"ocpp-lc: controller unreachable at {url}: {error}", err=True)
        raise typer.Exit(EXIT_RUNTIME) from None
    if response.status_code == 401:
        typer.echo(f"ocpp-lc: unauthorized at {url}: wrong or missing token (--token or [http] token)", err=True)
        raise typer.Exit(EXIT_UNAUTHORIZED)
    return response


def _document(response: httpx.Response, url: str) -> dict[str, Any]:
    try:
        document = response.json()
    except ValueError:
        document = None
    if not isinstance(document, dict):
        typer.echo(f"ocpp-lc: {url} answered HTTP {response.status_code}, not an ocpp-lc controller?", err=True)
        raise typer.Exit(EXIT_RUNTIME)
    return document


def _refused(response: httpx.Response, url: str) -> NoReturn:
    document = _document(response, url)
    typer.echo(f"ocpp-lc: refused (HTTP {response.status_code}): {document.get('error', '')}", err=True)
    for field_name, reason in (document.get("fields") or {}).items():
        typer.echo(f"  {field_name}: {reason}", err=True)
    raise typer.Exit(EXIT_REFUSED)


def _amount(value: float | None, unit: str) -> str:
    return "none" if value is None else f"{value:g} {unit}"


def _print_status(document: dict[str, Any]) -> None:
    stations = document.get("stations", [])
    typer.echo(f"stations connected: {len(stations)}")
    for station in stations:
        typer.echo(
            f"  {station['station_id']}  since {station['connected_since']}  "
            f"({station['connected_for_s']:.0f} s)  {station['subprotocol'] or '-'}"
        )
    own = document.get("own_identity", {})
    if own.get("connect"):
        link = "up" if own.get("link_up") else "down"
        typer.echo(f"own identity {own.get('identity')}: link {link}, boot {own.get('boot_status') or 'not yet'}")
    else:
        typer.echo(f"own identity {own.get('identity')}: off ([controller] connect = false)")
    limits = document.get("limits", {})
    typer.echo("limit in force:")
    for phase, limit in limits.get("phases", {}).items():
        typer.echo(f"  {phase}: {_amount(limit['limit_amperes'], 'A')}  source {limit['source'] or '-'}")
    power = limits.get("power", {})
    typer.echo(f"  power: {_amount(power.get('limit_watts'), 'W')}  source {power.get('source') or '-'}")
    if limits.get("failsafe_active"):
        typer.echo(f"  failsafe active: {limits.get('failsafe_current_amperes'):g} A per phase")
    for source in limits.get("sources", []):
        state = "stale" if source.get("stale") else f"valid until {source['valid_until']}"
        typer.echo(f"  ems source {source['source']}: {_amount(source['limit_now'], source['unit'])}, {state}")
    if limits.get("nodes"):
        typer.echo("limit in force per node (the lowest of config, CSMS, EMS and the node's meter):")
        for line in node_lines(limits["nodes"]):
            typer.echo(line)
    balancing = document.get("balancing")
    if balancing is None:
        typer.echo("balancing: off ([balancing] enabled = false)")
    else:
        released = "  (released: the controller's profiles were cleared)" if balancing.get("released") else ""
        typer.echo(f"balancing: {balancing.get('sessions', 0)} sessions{released}")
        for key, words in (("overdrawing", "EVSEs overdrawing"), ("unconfirmed_since_restart", "EVSEs unconfirmed")):
            if balancing.get(key):
                typer.echo(f"  {words}: {balancing[key]} (counted above what they accepted)")
        for phase, values in balancing.get("phases", {}).items():
            typer.echo(
                f"  {phase}: limit {_amount(values.get('limit_amperes'), 'A')}, committed "
                f"{values.get('committed_amperes', 0):g} A, measured {values.get('measured_amperes', 0):g} A, "
                f"headroom {_amount(values.get('headroom_amperes'), 'A')}"
            )
        for row in balancing.get("evses", []):
            session = f"tx {row['transaction_id']}" if row.get("transaction_id") else "idle"
            steer = _evse_state(row)
            protocol = (row.get("protocol") or "").removeprefix("ocpp") or "?"
            typer.echo(
                f"  {row['station_id']}/{row['evse_id']}  [{protocol}]  {session}  allocated "
                f"{_amount(row.get('allocated_amperes'), 'A')}  installed {_amount(row.get('installed_amperes'), 'A')}"
                f"  measured {_amount(row.get('measured_current_amperes'), 'A')}{steer}"
            )
    for line in meter_status_lines(document.get("meters")):
        typer.echo(line)
    for line in mqtt_status_lines(document.get("mqtt")):
        typer.echo(line)
    upstream = document.get("upstream", {})
    link_up = upstream.get("link_up")
    state = "unknown (own connection off)" if link_up is None else ("up" if link_up else "down")
    typer.echo(f"upstream {upstream.get('csms_url')}: {state}")
    _print_autonomy(document.get("autonomy"))


def _size(size_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size_bytes < 1024 or unit == "GiB":
            return f"{size_bytes:.0f} {unit}" if unit == "B" else f"{size_bytes:.1f} {unit}"
        size_bytes /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _print_autonomy(autonomy: dict[str, Any] | None) -> None:
    """Site autonomy: which stations are served without their CSMS, for how long, and what waits for it."""
    if autonomy is None:
        typer.echo("autonomy: off ([autonomy] enabled = false: a lost CSMS connection closes the station)")
        return
    stations = autonomy.get("stations", [])
    bound = autonomy.get("queue_max_bytes")
    queued = f"{autonomy.get('queue_messages', 0)} messages, {_size(autonomy.get('queue_bytes', 0))}" + (
        f" of {_size(bound)}" if bound else ""
    )
    if not stations:
        typer.echo(f"autonomy: every station relayed; kept for the CSMS: {queued}")
        return
    counts = {mode: sum(1 for station in stations if station["mode"] == mode) for mode in ("local", "replaying")}
    typer.echo(
        f"autonomy: {counts['local']} served locally (CSMS unreachable), {counts['replaying']} replaying; "
        f"kept for the CSMS: {queued}"
    )
    for station in stations:
        left = "left to replay" if station["mode"] == "replaying" else "queued"
        typer.echo(
            f"  {station['station_id']}  {station['mode']:<9}  without CSMS {_duration(station['offline_for_s'])}"
            f"  {station['queued_messages']} {left}"
        )


def _evse_state(row: dict[str, Any]) -> str:
    """Why an EVSE is counted above what it accepted, if it is."""
    if row.get("compliant", True):
        return ""
    if row.get("steerable") is False:
        return "  (unsteerable: no smart charging; counted at its maximum)"
    if row.get("steerable") is None and "steerable" in row:
        return "  (asking whether it does smart charging: counted at its maximum)"
    if row.get("overdrawing"):
        return "  (OVERDRAWING: counted at its measured draw)"
    if row.get("unconfirmed_since_restart"):
        return "  (unconfirmed since restart: counted at its maximum)"
    return "  (not steerable now: counted at its maximum)"


@cli.command(epilog=CLIENT_EXIT_CODES_HELP)
def status(
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the controller's status document as JSON.")] = False,
) -> None:
    """Show a running controller: connected stations, its own identity, the limit in force, the CSMS link,
    and which stations are served locally while their CSMS is unreachable (site autonomy)."""
    base, token = _endpoint(config, url, token)
    response = _request("GET", base, token, "/api/v1/status")
    document = _document(response, base)
    if response.status_code != 200:
        _refused(response, base)
    if as_json:
        typer.echo(json.dumps(document, indent=2))
    else:
        _print_status(document)


limit_cli = typer.Typer(
    help="Set or clear a site limit on a running controller, as an EMS would.", no_args_is_help=True
)
cli.add_typer(limit_cli, name="limit")


@limit_cli.command("set", epilog=CLIENT_EXIT_CODES_HELP)
def limit_set(
    source: Annotated[str, typer.Argument(help="The EMS source name (e.g. pv, tariff).")],
    amperes: Annotated[float | None, typer.Option("--amperes", help="Per-phase current limit in A.")] = None,
    watts: Annotated[float | None, typer.Option("--watts", help="Power limit in W.")] = None,
    valid_for: Annotated[
        float | None, typer.Option("--valid-for", help="Seconds the limit stays valid (default: the controller's).")
    ] = None,
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Set SOURCE's limit (PUT /api/v1/limits/SOURCE): exactly one of --amperes and --watts."""
    if (amperes is None) == (watts is None):
        typer.echo("ocpp-lc: give exactly one of --amperes and --watts", err=True)
        raise typer.Exit(EXIT_CONFIG)
    base, token = _endpoint(config, url, token)
    body: dict[str, Any] = {"unit": "A", "limit": amperes} if amperes is not None else {"unit": "W", "limit": watts}
    if valid_for is not None:
        body["valid_for_s"] = valid_for
    response = _request("PUT", base, token, f"/api/v1/limits/{quote(source, safe='')}", body)
    if response.status_code != 200:
        _refused(response, base)
    accepted = _document(response, base)
    typer.echo(
        f"limit {accepted['source']} set: {_amount(accepted['limit_now'], accepted['unit'])}, "
        f"valid until {accepted['valid_until']}"
    )


@limit_cli.command("clear", epilog=CLIENT_EXIT_CODES_HELP)
def limit_clear(
    source: Annotated[str, typer.Argument(help="The EMS source name.")],
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Release SOURCE's limit (DELETE /api/v1/limits/SOURCE)."""
    base, token = _endpoint(config, url, token)
    response = _request("DELETE", base, token, f"/api/v1/limits/{quote(source, safe='')}")
    if response.status_code != 200:
        _refused(response, base)
    typer.echo(f"limit {source} cleared")


balancing_cli = typer.Typer(help="Act on a running controller's balancing.", no_args_is_help=True)
cli.add_typer(balancing_cli, name="balancing")


@balancing_cli.command("release", epilog=CLIENT_EXIT_CODES_HELP + " 5 some station's profiles are not cleared.")
def balancing_release(config: ConfigOption = None, url: UrlOption = None, token: TokenOption = None) -> None:
    """Before removing the controller from a site: stop balancing and clear every charging profile of the
    controller's on every connected station (POST /api/v1/balancing/release), so each falls back to its own
    defaults. Stations not connected now drop them when their validity ends ([balancing] profile_validity_s).
    Balancing stays stopped until the controller restarts."""
    base, token = _endpoint(config, url, token)
    response = _request("POST", base, token, "/api/v1/balancing/release")
    document = _document(response, base)
    if response.status_code != 200:
        _refused(response, base)
    incomplete = 0
    for station in document.get("stations", []):
        failed = station.get("failed") or []
        if failed:
            incomplete += 1
            reasons = ", ".join(f"{item['profile_id']}: {item['reason']}" for item in failed)
            typer.echo(f"{station['station_id']}: NOT cleared ({reasons})")
        else:
            typer.echo(f"{station['station_id']}: cleared {len(station.get('cleared_profile_ids', []))} profile ids")
    stations = len(document.get("stations", []))
    typer.echo(f"balancing released; {stations - incomplete} of {stations} connected stations cleared")
    if incomplete:
        raise typer.Exit(EXIT_INCOMPLETE)


TRACE_EXIT_CODES_HELP = (
    "Exit codes: 0 stopped with Ctrl-C; 1 controller unreachable, or it went away during the trace; "
    "2 configuration problem; 3 refused by the controller (too many traces open, or an identity no station "
    "can have); 4 unauthorized (wrong or missing token)."
)


def _clock_time(iso_time: Any) -> str:
    """``HH:MM:SS.mmm`` in local time for an ISO 8601 time from the controller (as sent if unreadable)."""
    try:
        moment = datetime.datetime.fromisoformat(str(iso_time)).astimezone()
    except ValueError:
        return str(iso_time)
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def _print_trace_line(line: str) -> None:
    """One NDJSON line of a trace, as a person reads it."""
    try:
        document = json.loads(line)
    except ValueError:
        typer.echo(f"? {line}")
        return
    if not isinstance(document, dict):
        typer.echo(f"? {line}")
        return
    at = _clock_time(document.get("t"))
    if "frame" in document:
        typer.echo(f"{at} +{float(document.get('dt_s') or 0):.3f}s {document.get('direction')} {document['frame']}")
    elif "trace" in document:
        state = "connected now" if document.get("connected") else "not connected now: waiting for it"
        typer.echo(f"{at} tracing {document['trace']} ({state}); Ctrl-C to stop")
    elif document.get("event") == "connected":
        typer.echo(f"{at} -- connected ({document.get('subprotocol') or 'no subprotocol'})")
    elif document.get("event") == "disconnected":
        typer.echo(f"{at} -- disconnected ({document.get('reason') or 'no reason given'})")
    elif "dropped" in document:
        typer.echo(f"{at} !! {document['dropped']} frames or events lost here: this trace did not keep up")
    else:
        typer.echo(f"{at} ? {line}")


@cli.command(epilog=TRACE_EXIT_CODES_HELP)
def trace(
    identity: Annotated[str, typer.Argument(help="The station's identity (the last part of its connection URL).")],
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the controller's NDJSON lines unchanged (one JSON object per line).")
    ] = False,
) -> None:
    """Follow one station's OCPP-J frames live, both directions, with timing, until Ctrl-C.

    Each frame relayed between the station and the CSMS is printed as it passes, exactly as it travelled:

      14:02:03.123 +0.004s station->csms [2,"19","Heartbeat",{}]

    That is the local time, the seconds since the previous frame, who sent it to whom, and the frame.

    "--" lines say when the station connects or disconnects. A station that is not connected is waited for.

    "!!" lines say frames were lost because this terminal did not keep up (forwarding never waits for a trace).

    Calls the controller itself sends to the station (its charging profiles) show as lc->station, the
    station's answers as station->lc: they never reach the CSMS.
    """
    base, token = _endpoint(config, url, token)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    # The connection must come up promptly; after that the trace may be silent for as long as the station is.
    timeout = httpx.Timeout(CLIENT_TIMEOUT_S, read=None)
    path = f"/api/v1/trace/{quote(identity, safe='')}"
    streaming = False
    try:
        with (
            httpx.Client(base_url=base, timeout=timeout, trust_env=False) as client,
            client.stream("GET", path, headers=headers) as response,
        ):
            if response.status_code == 401:
                typer.echo(
                    f"ocpp-lc: unauthorized at {base}: wrong or missing token (--token or [http] token)", err=True
                )
                raise typer.Exit(EXIT_UNAUTHORIZED)
            if response.status_code != 200:
                response.read()
                _refused(response, base)
            streaming = True
            for line in response.iter_lines():
                if not line:
                    continue  # the controller's keep-alive
                if as_json:
                    typer.echo(line)
                else:
                    _print_trace_line(line)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    except httpx.HTTPError as error:
        if not streaming:
            typer.echo(f"ocpp-lc: controller unreachable at {base}: {error}", err=True)
            raise typer.Exit(EXIT_RUNTIME) from None
    typer.echo(f"ocpp-lc: the controller at {base} ended the trace (stopped or restarting?)", err=True)
    raise typer.Exit(EXIT_RUNTIME)


def main() -> None:
    """Console-script entry point (see also :mod:`router.entry`)."""
    try:
        cli()
    except KeyboardInterrupt:
        # Ctrl-C before the appliance installed its own signal handling: stop quietly.
        raise SystemExit(130) from None
