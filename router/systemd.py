"""Tell systemd how the controller is doing: the sd_notify protocol, without libsystemd.

Theory of operation: systemd (with ``Type=notify``) passes the path of a unix datagram socket in
``NOTIFY_SOCKET``; the service sends newline-separated ``KEY=value`` lines to it. ``READY=1`` ends the
start-up (until then ``systemctl start`` waits), ``STATUS=`` is what ``systemctl status`` shows,
``STOPPING=1`` announces a shutdown, ``RELOADING=1`` a restart in the same process and ``WATCHDOG=1``
proves the service is alive: with ``WatchdogSec=`` systemd passes ``WATCHDOG_USEC`` and kills and
restarts the service when no ``WATCHDOG=1`` came within it. The controller sends those pings from a
trio task (:meth:`SystemdNotifier.feed_watchdog`), so a blocked event loop, the one failure no
exception reports, stops them and systemd restarts the process.

A path starting with ``@`` names a socket in Linux's abstract namespace (the ``@`` becomes a NUL
byte). Without ``NOTIFY_SOCKET`` (a terminal, a container, a test) every method does nothing, so the
code that calls them needs no conditions. Sending never blocks the event loop: the socket is
non-blocking, and a message systemd's full queue cannot take is logged and dropped (the next
watchdog ping comes half a period later).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

import trio

log = logging.getLogger("ocpp_lc.systemd")


class SystemdNotifier:
    """Send sd_notify messages to ``address``; a no-op when ``address`` is None."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        #: systemd's watchdog period in microseconds (None: no watchdog).
        self.watchdog_usec = watchdog_usec

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        """The notifier systemd asked for through ``environ`` (default: this process's environment).

        The watchdog is ours only when ``WATCHDOG_PID`` is unset or names this process (as in
        sd_watchdog_enabled(3)); a ``NOTIFY_SOCKET`` that is neither a path nor abstract is ignored.
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            log.warning("NOTIFY_SOCKET %r is not a unix socket path: not notifying systemd", address)
            address = None
        usec: int | None = None
        pid = env.get("WATCHDOG_PID")
        if env.get("WATCHDOG_USEC", "").isdigit() and (pid is None or pid == str(os.getpid())):
            usec = int(env["WATCHDOG_USEC"]) or None
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        """True when messages go somewhere."""
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often :meth:`feed_watchdog` pings: half systemd's period, as sd_watchdog_enabled(3) advises."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2_000_000

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` (``KEY=value``) as one message; True if it was sent (False also when disabled)."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto("\n".join(lines).encode(), target)
        except OSError as error:
            # systemd gone or its queue full: nothing here can fix that, and serving stations matters more.
            log.warning("could not notify systemd (%s): %s", lines[0].split("=", 1)[0] if lines else "", error)
            return False
        return True

    def ready(self, status: str) -> bool:
        """Start-up is over: the ports listen (``READY=1``), with ``status`` for ``systemctl status``."""
        return self.notify("READY=1", f"STATUS={_one_line(status)}")

    def status(self, status: str) -> bool:
        """Update the line ``systemctl status`` shows."""
        return self.notify(f"STATUS={_one_line(status)}")

    def reloading(self, status: str) -> bool:
        """A restart in this process begins; :meth:`ready` ends it (systemd >= 253 wants the clock too)."""
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}", f"STATUS={_one_line(status)}")

    def stopping(self, status: str) -> bool:
        """A graceful shutdown begins (``STOPPING=1``)."""
        return self.notify("STOPPING=1", f"STATUS={_one_line(status)}")

    async def feed_watchdog(self) -> None:
        """Send ``WATCHDOG=1`` every :attr:`watchdog_interval_s` until cancelled (sleeps forever without one).

        The pings follow fixed deadlines, so a slightly late wake-up does not delay the next one; after a
        stall longer than a period (the loop was blocked, the machine suspended) one ping goes at once.
        """
        interval_s = self.watchdog_interval_s
        if not self.enabled or interval_s is None:
            await trio.sleep_forever()
        deadline = trio.current_time()
        while True:
            self.notify("WATCHDOG=1")
            # After a late wake-up (a suspended machine), ping at once, once, then keep the new beat.
            deadline = max(deadline + interval_s, trio.current_time())
            await trio.sleep_until(deadline)


def _one_line(text: str) -> str:
    # A newline would start a new KEY=value assignment in the message.
    return " ".join(text.split())


__all__ = ["SystemdNotifier"]
