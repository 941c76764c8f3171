"""The systemd notify protocol (``sd_notify``), hand-written: an adapter with no dependencies.

Owns: talking to the service manager through ``$NOTIFY_SOCKET`` -- one ``AF_UNIX``/``SOCK_DGRAM``
datagram per call, newline-joined ``KEY=value`` assignments -- and reading the watchdog settings
(``$WATCHDOG_USEC``, ``$WATCHDOG_PID``) that ``WatchdogSec=`` in ``agent.service`` hands us.

Called by the daemon (``agent run``): ``ready()`` once its scheduler and control socket are up
(``Type=notify`` holds ``systemctl start`` until then), ``status()`` with one line per pass, ``watchdog()`` from the
scheduler loop at ``watchdog_interval_s``, ``stopping()`` on shutdown and ``reloading()`` if it
ever re-reads its config in place.

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op. A failed send is swallowed: the
manager going away or the socket vanishing must never crash the agent, and there is no one to
log to about it that would help (the watchdog, if armed, is what notices a stuck agent).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier"]


class Notifier:
    """Sends state changes to systemd. Cheap to build; the socket is opened on first send."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # Abstract-namespace sockets are spelled with a leading '@' in the environment.
        self._address: str | None = ("\0" + address[1:] if address.startswith("@") else address) or None
        self._watchdog_usec = _positive_int(env.get("WATCHDOG_USEC"))
        self._watchdog_pid = _positive_int(env.get("WATCHDOG_PID"))
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that asked for notifications."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to call :meth:`watchdog`: half of ``WatchdogSec=`` (as systemd advises), or
        None when no watchdog is armed for this process."""
        if self._watchdog_usec is None:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def ready(self, status: str | None = None) -> None:
        self._send("READY=1", *(() if status is None else (_status(status),)))

    def status(self, text: str) -> None:
        self._send(_status(text))

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def reloading(self) -> None:
        self._send("RELOADING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, *assignments: str) -> None:
        if self._address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(assignments).encode(), self._address)
        except OSError:
            # Manager gone, socket removed, queue full: never the agent's problem. Drop the
            # socket so the next call starts clean.
            self.close()


def _status(text: str) -> str:
    # A STATUS= value ends at the newline; keep the whole message on its one line.
    return "STATUS=" + " ".join(text.splitlines())


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(value) if value else 0
    except ValueError:
        return None
    return number if number > 0 else None
