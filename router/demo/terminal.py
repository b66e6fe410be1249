"""The demo's terminal: where it writes (plain lines or live full-screen frames), the warnings it keeps
out of the live view's way, and how it is told to stop.

If the reader goes away (``ocpp-lc demo | head``) the demo stops as if Ctrl-C had been pressed; the
live view draws on the terminal's alternate screen and gives the normal one back when it ends.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import deque
from collections.abc import Callable
from typing import Final, TextIO

import trio

from .clock import WallClock
from .view import ScreenLine, wall_time

# ANSI control sequences for the live view: alternate screen, cursor, home, clear to end of line / screen.
_ENTER_SCREEN: Final = "\x1b[?1049h\x1b[?25l\x1b[2J"
_LEAVE_SCREEN: Final = "\x1b[?25h\x1b[?1049l"
_HOME: Final = "\x1b[H"
_CLEAR_LINE: Final = "\x1b[K"
_CLEAR_BELOW: Final = "\x1b[J"
_BOLD: Final = "\x1b[1m"
_RESET: Final = "\x1b[0m"


class StopRequest:
    """How the demo is told to stop: the first request is graceful, a second one is urgent."""

    def __init__(self) -> None:
        self.graceful = trio.Event()
        self.urgent = trio.Event()

    def request(self) -> None:
        """Ask for a graceful stop; asked again, stop at once."""
        if self.graceful.is_set():
            self.urgent.set()
        self.graceful.set()


class LogCapture(logging.Handler):
    """Keeps warnings and errors from the run (the router's included) out of the live view's way."""

    def __init__(self, emit_line: Callable[[str], None] | None) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        #: Warnings during the planned outage (each station's lost CSMS connection ...): shown, not errors.
        self.expecting = False
        self.expected = 0
        self.recent: deque[str] = deque(maxlen=3)
        self._emit_line = emit_line

    def expect(self, expecting: bool) -> None:
        self.expecting = expecting

    def emit(self, record: logging.LogRecord) -> None:
        if self.expecting and record.levelno == logging.WARNING:
            self.expected += 1
        else:
            self.count += 1
        text = f"{record.levelname.lower()}: {record.getMessage()}"
        self.recent.append(text)
        if self._emit_line is not None:
            self._emit_line(text)


class Output:
    """Where the demo writes: line by line (``plain``) or full-screen frames (``live``).

    If the reader goes away (``ocpp-lc demo | head``), the demo stops as if Ctrl-C had been pressed.
    """

    def __init__(self, out: TextIO, *, live: bool, clock: WallClock, on_closed: Callable[[], None]) -> None:
        self.out = out
        self.live = live
        self.unicode = (getattr(out, "encoding", None) or "").lower().replace("-", "") in ("utf8", "utf8sig")
        self._origin = (trio.current_time(), clock())
        self._on_closed = on_closed
        self._closed = False

    def text(self, text: str) -> str:
        return text if self.unicode else text.replace("→", "->").replace("·", "|")

    def write(self, text: str) -> None:
        if self._closed:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except BrokenPipeError:
            self._closed = True
            if self.out is sys.stdout:
                # What Python's documentation advises, so that the interpreter's own last flush of
                # stdout at exit does not complain about the pipe as well.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            self._on_closed()

    def line(self, text: str) -> None:
        """One timestamped line (plain mode only: the live view owns the screen)."""
        if not self.live:
            self.write(f"{wall_time(trio.current_time(), *self._origin)}  {self.text(text)}\n")

    def size(self) -> tuple[int, int]:
        try:
            size = os.get_terminal_size(self.out.fileno())
        except (OSError, ValueError, AttributeError):
            return 80, 24
        return size.columns, size.lines

    def frame(self, lines: list[ScreenLine]) -> None:
        # Every line clears its own rest, the last one the rest of the screen; no newline after the
        # last line, so a full screen never scrolls.
        body = "\n".join(
            f"{_BOLD}{line.text}{_RESET}{_CLEAR_LINE}" if line.emphasis else f"{line.text}{_CLEAR_LINE}"
            for line in lines
        )
        self.write(_HOME + body + _CLEAR_BELOW)

    def enter_screen(self) -> None:
        """Switch to the alternate screen and hide the cursor (the live view)."""
        self.write(_ENTER_SCREEN)

    def leave_screen(self) -> None:
        """Show the cursor and give the normal screen back."""
        self.write(_LEAVE_SCREEN)
