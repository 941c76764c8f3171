"""The systemd side of the daemon: ``agent.service`` (checked by ``systemd-analyze verify``) and
``agent.notify`` (sd_notify) against real ``AF_UNIX`` datagram sockets, in-process and from a
separate process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.adapters.systemd import Notifier

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "agent.service"


# --------------------------------------------------------------------------- the unit


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value in order (systemd keys may repeat and accumulate)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"assignment outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def words(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> list[str]:
    return [w for value in unit[section].get(key, []) for w in value.split()]


def verify(unit_text: str, tmp_path: Path) -> tuple[int, list[str], str]:
    """Runs ``systemd-analyze verify`` on a copy of the unit whose ExecStart binary exists here.

    Returns the exit status, the stderr lines about our unit file, and all of stderr."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    # verify fails on a missing ExecStart binary; /usr/local/bin/agent only exists on a host.
    exe = shutil.which("agent") or sys.executable
    copy = tmp_path / UNIT.name
    copy.write_text(unit_text.replace("ExecStart=/usr/local/bin/agent ", f"ExecStart={exe} "))
    assert f"ExecStart={exe} " in copy.read_text()
    done = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    ours = [line for line in done.stderr.splitlines() if str(copy) in line or UNIT.name in line]
    return done.returncode, ours, done.stderr


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    rc, ours, stderr = verify(UNIT.read_text(), tmp_path)
    print(stderr)
    assert rc == 0, stderr
    bad = [line for line in ours if "Unknown" in line or "Failed" in line or "not executable" in line]
    assert not bad, stderr


def test_verify_check_has_teeth(tmp_path: Path) -> None:
    """systemd-analyze exits 0 on an unknown key, only warning: the stderr filter is what catches it."""
    rc, ours, stderr = verify(UNIT.read_text().replace("[Service]\n", "[Service]\nWatchDogSec=60s\n"), tmp_path)
    assert rc == 0, stderr
    assert any("Unknown key" in line and "WatchDogSec" in line for line in ours), stderr


def test_unit_contents() -> None:
    unit = parse_unit(UNIT.read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["Restart"] == ["on-failure"]
    assert service["WatchdogSec"] == ["60s"]
    assert service["ExecStart"] == ["/usr/local/bin/agent run --config /etc/llm-agent/agent.toml"]
    assert "docker.service" in words(unit, "Unit", "After")
    assert "network-online.target" in words(unit, "Unit", "After")
    # Wants=, deliberately not Requires=: the agent starts and reports even if docker is down.
    assert "docker.service" in words(unit, "Unit", "Wants")
    assert "Requires" not in unit["Unit"]
    assert "/var/lib/llm-agent" in words(unit, "Service", "ReadWritePaths")
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_exec_start_is_a_valid_agent_command_line() -> None:
    """What the unit runs parses as an `agent` command (the daemon, with its config file)."""
    from agent.cli.commands import _parser

    argv = parse_unit(UNIT.read_text())["Service"]["ExecStart"][0].split()[1:]
    args = _parser().parse_args(argv)
    assert args.command == "run" and str(args.config) == "/etc/llm-agent/agent.toml"


# --------------------------------------------------------------------------- sd_notify


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd's notify socket; yields (socket, path)."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(10)
        yield sock, path


def recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def assert_nothing_queued(sock: socket.socket) -> None:
    sock.settimeout(0)  # non-blocking: an empty queue raises at once
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


def test_notify_datagrams(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    with Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}) as n:
        assert n.enabled
        assert n.watchdog_interval_s == 1.0
        n.ready("first pass ok")
        n.status("pass 2: 3 changes\napplied")
        n.watchdog()
        n.reloading()
        n.stopping()
        n.ready()
    assert recv(sock) == "READY=1\nSTATUS=first pass ok"
    assert recv(sock) == "STATUS=pass 2: 3 changes applied"
    assert recv(sock) == "WATCHDOG=1"
    assert recv(sock) == "RELOADING=1"
    assert recv(sock) == "STOPPING=1"
    assert recv(sock) == "READY=1"
    assert_nothing_queued(sock)


def test_notify_abstract_socket() -> None:
    name = f"llm-agent-test-{os.getpid()}-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        with Notifier({"NOTIFY_SOCKET": "@" + name}) as n:
            n.ready("abstract")
            n.watchdog()
        assert recv(sock) == "READY=1\nSTATUS=abstract"
        assert recv(sock) == "WATCHDOG=1"


def test_watchdog_interval() -> None:
    me = str(os.getpid())
    assert Notifier({"WATCHDOG_USEC": "60000000"}).watchdog_interval_s == 30.0
    assert Notifier({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": me}).watchdog_interval_s == 1.0
    assert Notifier({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval_s is None
    assert Notifier({}).watchdog_interval_s is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval_s is None
    assert Notifier({"WATCHDOG_USEC": "soon"}).watchdog_interval_s is None


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch, listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with Notifier() as n:
        assert n.watchdog_interval_s == 2.0
        n.watchdog()
    assert recv(sock) == "WATCHDOG=1"


def test_no_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    for n in (Notifier({}), Notifier({"NOTIFY_SOCKET": ""}), Notifier()):
        assert not n.enabled
        n.ready("x")
        n.status("x")
        n.watchdog()
        n.stopping()
        n.reloading()
        assert n._sock is None  # never even opened a socket
        n.close()


def test_missing_socket_does_not_raise(tmp_path: Path) -> None:
    with Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) as n:
        assert n.enabled
        n.ready("x")
        n.status("x")
        n.watchdog()
        n.stopping()
        n.reloading()
    with Notifier({"NOTIFY_SOCKET": "@llm-agent-test-nobody-" + uuid.uuid4().hex}) as n:
        n.ready("x")


def test_socket_vanishing_mid_life_does_not_raise(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with Notifier({"NOTIFY_SOCKET": path}) as n:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(10)
            n.watchdog()
            assert recv(sock) == "WATCHDOG=1"
        os.unlink(path)  # manager gone
        n.watchdog()
        # ... and back (systemd re-executed): the next send reaches the new socket.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(10)
            n.watchdog()
            assert recv(sock) == "WATCHDOG=1"


def test_separate_process_can_notify(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    env["NOTIFY_SOCKET"] = path
    code = "from agent.adapters.systemd import Notifier; n=Notifier(); n.ready('x'); n.watchdog(); n.close()"
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert recv(sock) == "READY=1\nSTATUS=x"
    assert recv(sock) == "WATCHDOG=1"
