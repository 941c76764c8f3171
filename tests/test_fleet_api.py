"""The fleet API on a real TCP port: reports taken, forged or broken ones refused (the fleet
state unchanged), state back after a restart, refusals counted in /metrics."""

from __future__ import annotations

import json
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.core.errors import ConfigError
from agent.fleet.api import FleetApi
from tests.controlkit import json_error, parse
from tests.fleetkit import fleet_api
from tests.test_fleet_report import BOOT_A, BOOT_B, NOW, report_data

TOKENS = {"gpu-1": "tok-gpu-1-secret", "gpu-2": "tok-gpu-2-secret", "motoko": "tok-motoko-secret"}


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


_client: list[httpx.Client] = []


@pytest.fixture(autouse=True, scope="module")
def _one_client() -> Iterator[None]:
    """One client for the module: each new one loads the CA bundle (80 ms)."""
    with httpx.Client(timeout=5) as client:
        _client.append(client)
        yield
        _client.clear()


def http() -> httpx.Client:
    return _client[0]


def post(
    api: FleetApi, data: Any, auth: str | None = "Bearer tok-gpu-1-secret", raw: bytes | None = None
) -> httpx.Response:
    headers = {"Authorization": auth} if auth is not None else {}
    body = raw if raw is not None else json.dumps(data).encode()
    return http().post(f"{api.url}/v1/reports", content=body, headers=headers)


def fleet(api: FleetApi) -> dict[str, Any]:
    data: dict[str, Any] = http().get(f"{api.url}/v1/fleet").json()
    return data


def host(api: FleetApi, name: str) -> dict[str, Any]:
    return next(h for h in fleet(api)["hosts"] if h["host"] == name)


def metric(api: FleetApi, line_start: str) -> float:
    text = http().get(f"{api.url}/metrics").text
    return float(next(line for line in text.splitlines() if line.startswith(line_start)).rsplit(" ", 1)[1])


def test_a_valid_report_is_accepted_and_shown_in_the_fleet_view(tmp_path: Path) -> None:
    clock = Clock()
    with fleet_api(tmp_path / "fleet.sqlite", TOKENS, clock) as api:
        r = post(api, report_data())
        assert r.status_code == 200, r.text
        assert r.json() == {"accepted": True, "host": "gpu-1", "boot_id": BOOT_A, "seq": 1}
        clock.now += 7
        view = host(api, "gpu-1")
        others = {h["host"]: h for h in fleet(api)["hosts"]}
    assert view["reported"] and view["role"] == "gpu_node" and view["commit"] == "0123abc"
    assert view["stage"] == "ready" and view["age_s"] == 7 and view["reports"] == 1
    assert view["load"] == {"running": 1, "waiting": 0} and view["gpu"].startswith("1x NVIDIA H200")
    assert view["ready"] is False and view["health"]  # one check of three: not ready, and why
    assert others["gpu-2"] == {"host": "gpu-2", "reported": False}


def _accept_one(api: FleetApi) -> dict[str, Any]:
    assert post(api, report_data(seq=5)).status_code == 200
    return fleet(api)


@pytest.fixture(scope="module")
def one_report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetApi]:
    """One API for the refusal cases, holding gpu-1's report seq 5: no case may change it."""
    with fleet_api(tmp_path_factory.mktemp("fleet") / "fleet.sqlite", TOKENS, Clock()) as api:
        _accept_one(api)
        yield api


@pytest.mark.parametrize(
    ("kwargs", "code", "fragment", "reason"),
    [
        ({"auth": None}, 401, "bearer token", "unauthenticated"),
        ({"auth": "Bearer tok-gpu-1-wrong"}, 401, "unknown token", "unauthenticated"),
        ({"auth": "Bearer"}, 401, "bearer token", "unauthenticated"),
        ({"auth": "Basic dG9rLWdwdS0xLXNlY3JldA=="}, 401, "bearer token", "unauthenticated"),
        ({"auth": "Bearer tok-gpu-2-secret"}, 403, "only for itself", "wrong_host"),  # gpu-2 claims to be gpu-1
        ({"data": report_data(seq=6, sent_at=NOW - 61)}, 422, "stale", "stale"),
        ({"data": report_data(seq=6, sent_at=NOW + 3600)}, 422, "future", "future"),
        ({"data": report_data(seq=5)}, 409, "replay", "replay"),
        ({"data": report_data(seq=4)}, 409, "replay", "replay"),
        ({"raw": b'{"host": "gpu-1",'}, 400, "not JSON", "invalid"),
        ({"raw": b"\xff\xfe"}, 400, "not JSON", "invalid"),
        ({"raw": b"[1, 2]"}, 400, "JSON object", "invalid"),
        ({"raw": b""}, 400, "invalid report", "invalid"),
        ({"data": report_data(seq=6, stage="bogus")}, 400, "stage", "invalid"),
        ({"data": report_data(seq="6")}, 400, "seq", "invalid"),
        ({"data": {**report_data(seq=6), "admin": True}}, 400, "admin", "invalid"),
    ],
    ids=[
        "no-token",
        "wrong-token",
        "empty-token",
        "basic-auth",
        "other-host",
        "stale",
        "future",
        "replay-same-seq",
        "replay-older-seq",
        "invalid-json",
        "not-utf8",
        "json-array",
        "empty-body",
        "bad-stage",
        "seq-as-string",
        "extra-field",
    ],
)
def test_a_forged_or_broken_report_is_refused_and_changes_nothing(
    one_report: FleetApi, kwargs: dict[str, Any], code: int, fragment: str, reason: str
) -> None:
    api, counted = one_report, f'llm_fleet_reports_rejected_total{{reason="{reason}"}}'
    before, refused_before = fleet(api), metric(api, counted)
    r = post(api, kwargs.pop("data", report_data(seq=6)), **kwargs)
    assert r.status_code == code, r.text
    error = r.json()["error"]
    assert fragment in error and "\n" not in error
    assert fleet(api) == before
    assert metric(api, counted) == refused_before + 1
    assert metric(api, 'llm_fleet_reports_accepted_total{host="gpu-1"}') == 1


def test_a_10_mb_body_is_refused_413_from_its_headers_alone(tmp_path: Path) -> None:
    with fleet_api(tmp_path / "fleet.sqlite", TOKENS, Clock()) as api:
        before = _accept_one(api)
        head = (
            "POST /v1/reports HTTP/1.1\r\nHost: motoko\r\nAuthorization: Bearer tok-gpu-1-secret\r\n"
            f"Content-Type: application/json\r\nContent-Length: {10 * 2**20}\r\n\r\n"
        ).encode()
        with socket.create_connection(api.address, timeout=5) as sock:
            sock.sendall(head + b"{" * 65536)  # the first 64 KiB of 10 MiB: the rest never comes
            got = b""
            while chunk := sock.recv(65536):
                got += chunk
        code, error = json_error(got)
        assert code == 413 and "too large" in error
        assert parse(got)[1]["connection"] == "close"
        assert fleet(api) == before
        assert metric(api, 'llm_fleet_reports_rejected_total{reason="too_large"}') == 1


def test_a_restarted_api_has_the_state_back_and_still_refuses_a_replay(tmp_path: Path) -> None:
    db = tmp_path / "fleet.sqlite"
    with fleet_api(db, TOKENS, Clock()) as api:
        assert post(api, report_data(seq=1)).status_code == 200
        assert post(api, report_data(seq=2, stage="draining")).status_code == 200
        before = fleet(api)
    with fleet_api(db, TOKENS, Clock()) as api:
        assert fleet(api) == before
        assert host(api, "gpu-1")["stage"] == "draining" and host(api, "gpu-1")["reports"] == 2
        assert post(api, report_data(seq=2)).status_code == 409  # the replay rule survives too
        assert metric(api, 'llm_fleet_reports_accepted_total{host="gpu-1"}') == 2
        assert post(api, report_data(boot_id=BOOT_B, seq=0, sent_at=NOW + 1)).status_code == 200
        assert host(api, "gpu-1")["boots"] == 2


def test_a_stored_report_this_agent_cannot_read_is_left_out_of_the_view(tmp_path: Path) -> None:
    db = tmp_path / "fleet.sqlite"
    with fleet_api(db, TOKENS, Clock()) as api:
        assert post(api, report_data()).status_code == 200
        with sqlite3.connect(db) as conn:  # as if stored by an agent with another schema
            conn.execute("UPDATE reports SET report = '{\"old\": 1}' WHERE host = 'gpu-1'")
        conn.close()
        assert host(api, "gpu-1") == {"host": "gpu-1", "reported": False}


def test_report_age_per_host_is_a_metric(tmp_path: Path) -> None:
    clock = Clock()
    with fleet_api(tmp_path / "fleet.sqlite", TOKENS, clock) as api:
        assert post(api, report_data()).status_code == 200
        clock.now += 12.5
        assert metric(api, 'llm_fleet_report_age_seconds{host="gpu-1"}') == 12.5


def test_unknown_routes_are_404_json(tmp_path: Path) -> None:
    with fleet_api(tmp_path / "fleet.sqlite", TOKENS, Clock()) as api:
        assert http().get(f"{api.url}/v1/nope").status_code == 404
        r = http().post(f"{api.url}/v1/fleet", content=b"{}")
        assert r.status_code == 404 and "error" in r.json()


def test_two_hosts_may_not_share_a_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="share a report token"):
        FleetApi(tmp_path / "fleet.sqlite", {"a": "same", "b": "same"})
