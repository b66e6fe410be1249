"""The ``ocpp-lc`` command.

Exit codes (also in ``ocpp-lc run --help``):

* 0: stopped on request (SIGINT/SIGTERM), or ``check-config`` found nothing wrong;
* 1: the appliance failed while running (e.g. a port already in use);
* 2: a configuration problem (the message names the file, the key and what is allowed);
* 3: the state store cannot be used (the message names the file and what to do about it).

Restart: when the CSMS resets the controller (Reset on its own identity, B11/B12), the appliance shuts
down gracefully, closing every station with 1001, and ``run`` starts it again in the same process, with
the same configuration and state directory; stations reconnect on their own. The service manager sees
one process throughout, so a restart never counts as a failure there.
"""

from __future__ import annotations

import logging
import signal
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, NoReturn, TypeVar

import trio
import typer

from .config import ConfigError, Settings, load_settings
from .store import Store, StoreError
from .systemd import SystemdNotifier

if TYPE_CHECKING:
    from .app import App

EXIT_RUNTIME = 1
EXIT_CONFIG = 2
EXIT_STATE = 3

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
    stations: Annotated[int, typer.Option(help="How many simulated stations.", min=1, max=200)] = 6,
    duration_s: Annotated[
        float, typer.Option("--duration", help="Stop after this many seconds (0: until Ctrl-C).", min=0)
    ] = 0,
    plain: Annotated[bool, typer.Option(help="Print events line by line instead of a live view.")] = False,
) -> None:
    """Show the controller working on loopback: a sandbox CSMS and simulated stations through the real router."""
    from .demo import run_demo

    raise typer.Exit(run_demo(stations=stations, duration_s=duration_s, plain=plain))


def main() -> None:
    """Console-script entry point (see also :mod:`router.entry`)."""
    try:
        cli()
    except KeyboardInterrupt:
        # Ctrl-C before the appliance installed its own signal handling: stop quietly.
        raise SystemExit(130) from None
