"""The console script's entry point, kept tiny so that Ctrl-C while the CLI is still importing
(pydantic, trio, typer take a moment) stops quietly instead of printing a traceback."""

from __future__ import annotations


def main() -> None:
    """Import the CLI and run it; exit 130 on Ctrl-C at any point before it handles signals."""
    try:
        from router.cli import main as cli_main
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    cli_main()
