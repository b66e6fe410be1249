"""The ``ocpp-lc`` command.

Exit codes: 0 success; 1 the appliance failed while running; 2 a configuration problem (the
message says which file, key and what is allowed).
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Annotated, Literal

import trio
import typer

from .config import ConfigError, Settings, load_settings

EXIT_RUNTIME = 1
EXIT_CONFIG = 2

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


async def serve_until_signalled(settings: Settings) -> None:
    """Run the appliance; the first SIGINT/SIGTERM shuts down gracefully, a second one at once."""
    from .app import run_app

    async with trio.open_nursery() as nursery:
        app = await nursery.start(run_app, settings)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if app.stopped.is_set():
                    break
                if not app._shutdown.is_set():
                    log.info("%s received: shutting down gracefully", signal.Signals(signum).name)
                    app.request_shutdown()
                    nursery.start_soon(_stop_watch, app, nursery)
                else:
                    log.warning("second signal: stopping now")
                    nursery.cancel_scope.cancel()
                    break


async def _stop_watch(app: object, nursery: trio.Nursery) -> None:
    from .app import App

    assert isinstance(app, App)
    await app.stopped.wait()
    nursery.cancel_scope.cancel()


@cli.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="The controller's TOML configuration file.")],
    log_format: Annotated[
        str | None, typer.Option("--log-format", help="'text' (default) or 'json' lines; overrides [log] format.")
    ] = None,
) -> None:
    """Run the controller with a configuration file until SIGINT/SIGTERM."""
    from .logs import setup_logging

    settings = _load(config)
    fmt: LogFormat = "json" if (log_format or settings.log.format) == "json" else "text"
    setup_logging(settings.log.level, fmt)
    try:
        trio.run(serve_until_signalled, settings)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        raise typer.Exit(EXIT_RUNTIME) from None


@cli.command("check-config")
def check_config(
    config: Annotated[Path, typer.Argument(help="The TOML configuration file to check.")],
) -> None:
    """Check a configuration file and explain every problem in plain words."""
    settings = _load(config)
    typer.echo(
        f"{config}: OK — identity {settings.controller.identity}, stations on {settings.stations.listen}"
        f"{settings.stations.path}/<identity>, CSMS {settings.csms.url}, HTTP on {settings.http.listen}"
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
    """Console-script entry point."""
    cli()
