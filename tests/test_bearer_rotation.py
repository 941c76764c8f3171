"""A bearer-token rotation in two reloads, with an overlap: the rule, the auth module, the passes.

The proxy accepts the keys whose SHA-256 its config lists (``general_settings.
llm_agent_accepted_key_sha256``), through the role's auth module (``config/fleet_auth.py``,
LiteLLM's ``custom_auth``). The rule (``agent.core.bearer.accepted_keys``, applied by the
renderer): the new key, plus the master key of the config on disk while it differs. So the
pass that applies a new key accepts both, says so in its plan, and asks for another pass at
once; that one, with the new key on disk, accepts the new key alone and retires the old one.

The real proxy under load: tests/test_token_rotation.py.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import subprocess
import textwrap
import threading
import time
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.adapters import proxy
from agent.adapters.secrets import EnvSecrets, SecretResolver
from agent.adapters.systemd import Notifier
from agent.core import bearer
from agent.core.outcomes import ActionKind, PassOutcome
from agent.daemon.service import NO_DUTIES, Daemon
from agent.desired.load import load_desired
from agent.desired.render import render_host
from agent.node.reconcile import PassOptions, PassResult, reconcile_once
from agent.testing.fakes import FakeClock, FakeEngine, FakeSource
from tests.conftest import DEMO_IDENTITY, ROOT, fake_settings
from tests.dockerkit import free_port
from tests.proxykit import litellm_bin
from tests.test_validate import edit

MODULE = ROOT / "roles/motoko/templates/fleet_auth.py"
CONFIG = "config/config.yaml"
OLD, NEW = "mkt-old-token-0123456789abcdef", "mkt-new-token-fedcba9876543210"


def fleet_auth() -> types.ModuleType:
    """The auth module as LiteLLM loads it: by its path, without the agent (or LiteLLM)."""
    spec = importlib.util.spec_from_file_location("fleet_auth", MODULE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def general(text: str) -> dict[str, Any]:
    settings: dict[str, Any] = yaml.safe_load(text)["general_settings"]
    return settings


# --------------------------------------------------------------------------- the rule


def test_the_rule_accepts_the_previous_key_only_while_it_differs() -> None:
    assert bearer.accepted_keys(NEW, None) == [NEW]
    assert bearer.accepted_keys(NEW, NEW) == [NEW]
    assert bearer.accepted_keys(NEW, OLD) == [NEW, OLD]
    assert bearer.key_digest(NEW) == sha(NEW)


def render(repo: Path, monkeypatch: pytest.MonkeyPatch, token: str, previous: str | None, reveal: bool = True) -> str:
    monkeypatch.setenv(EnvSecrets.var("litellm_bearer_token"), token)
    resolver = SecretResolver.for_repo(repo, identity=DEMO_IDENTITY)
    rendered = render_host(load_desired(repo), "motoko", resolver, reveal=reveal, previous_master_key=previous)
    assert rendered.stack.files["config/fleet_auth.py"].content == MODULE.read_text(), "rendered byte for byte"
    assert rendered.stack.files["config/fleet_auth.py"].mode == 0o644
    assert not rendered.stack.files["config/fleet_auth.py"].secret
    return rendered.stack.files[CONFIG].content


def test_the_render_lists_digests_never_keys_and_is_deterministic(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    alone = render(repo, monkeypatch, NEW, None)
    assert general(alone)["master_key"] == NEW
    assert general(alone)["custom_auth"] == "fleet_auth.user_api_key_auth"
    assert general(alone)[bearer.ACCEPTED_KEYS_SETTING] == [sha(NEW)]
    assert render(repo, monkeypatch, NEW, NEW) == alone, "the same key on disk: nothing to overlap"

    both = render(repo, monkeypatch, NEW, OLD)
    assert general(both)["master_key"] == NEW, "LiteLLM's own key: the new one"
    assert general(both)[bearer.ACCEPTED_KEYS_SETTING] == [sha(NEW), sha(OLD)]
    assert OLD not in both, "the old key only as its digest"
    assert render(repo, monkeypatch, NEW, OLD) == both, "same inputs, same bytes"
    assert proxy.accepted_digests(both) == (sha(NEW), sha(OLD))

    hidden = render(repo, monkeypatch, NEW, OLD, reveal=False)
    assert NEW not in hidden and OLD not in hidden and sha(NEW) not in hidden and sha(OLD) not in hidden
    assert general(hidden)[bearer.ACCEPTED_KEYS_SETTING] == ["**REDACTED**"]


def test_a_custom_auth_module_the_role_does_not_write_is_refused(
    repo: Path, roles_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli.commands import main

    edit(roles_copy / "motoko/role.yaml", "path: config/fleet_auth.py", "path: fleet_auth.py")
    assert main(["validate", "--repo", str(repo)]) != 0
    assert "config/fleet_auth.py next to config/config.yaml" in capsys.readouterr().out


# --------------------------------------------------------------------------- the auth module


PUBLIC = frozenset({"/", "/routes", "/health/liveliness", "/health/liveness"})


def test_the_module_agrees_with_the_agent() -> None:
    m = fleet_auth()
    assert m.SETTING == bearer.ACCEPTED_KEYS_SETTING
    assert m.digest(NEW) == bearer.key_digest(NEW)
    assert m.generation([sha(NEW), sha(OLD)]) == bearer.generation([sha(NEW), sha(OLD)])
    assert m.generation([sha(NEW)]) != m.generation([sha(NEW), sha(OLD)])
    assert proxy.PROBE_HEADER.lower() == m.PROBE_HEADER
    assert proxy._GENERATION.search(m.GENERATION + m.generation([sha(NEW)]))


def test_the_module_accepts_the_listed_keys_and_refuses_the_rest() -> None:
    m = fleet_auth()
    both = [sha(NEW), sha(OLD)]
    assert m.verdict("/v1/chat/completions", NEW, both, PUBLIC) == m.ADMIN
    assert m.verdict("/v1/model/info", OLD, both, PUBLIC) == m.ADMIN
    assert m.verdict("/v1/model/info", OLD, [sha(NEW)], PUBLIC) == m.REFUSED
    assert m.verdict("/v1/models", "mkt-guess", both, PUBLIC) == m.REFUSED
    assert m.verdict("/v1/models", None, both, PUBLIC) == m.NO_KEY
    assert m.verdict("/v1/models", "", both, PUBLIC) == m.MALFORMED
    # A digest is no key: sending the listed digest itself is refused.
    assert m.verdict("/v1/models", sha(NEW), both, PUBLIC) == m.REFUSED
    # No list, a list of junk, a list that is not a list: nothing is accepted.
    for digests in (None, [], ["**REDACTED**", 42, sha(NEW).upper()], sha(NEW), {sha(NEW): 1}):
        assert m.verdict("/v1/models", NEW, digests, PUBLIC) == m.REFUSED, digests
    # The routes LiteLLM serves without a key stay public, with a key or without.
    for route in PUBLIC:
        assert m.verdict(route, None, both, PUBLIC) == m.PUBLIC
        assert m.verdict(route, "mkt-guess", both, PUBLIC) == m.PUBLIC


def test_the_module_compares_in_constant_time_every_listed_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every comparison goes through ``hmac.compare_digest``, for every entry, even after a
    match: the time says nothing about which entry matched."""
    m = fleet_auth()
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(m.hmac, "compare_digest", counting)
    listed = [sha(NEW), sha(OLD), sha("a third")]
    assert m.accepted(NEW, listed)
    assert [b for _, b in calls] == [d.encode() for d in listed], "all three, though the first matched"
    assert all(a == sha(NEW).encode() for a, _ in calls)
    calls.clear()
    assert not m.accepted("mkt-guess", listed) and len(calls) == 3


_IN_LITELLM = textwrap.dedent(
    """
    import asyncio, importlib.util, json, sys
    from starlette.requests import Request
    import litellm.proxy.proxy_server as ps
    from litellm.proxy._types import ProxyException

    spec = importlib.util.spec_from_file_location("fleet_auth", sys.argv[1])
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    ps.general_settings = {"master_key": "x", m.SETTING: json.loads(sys.argv[2])}

    def request(path, headers=()):
        scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "query_string": b"",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in headers]}
        return Request(scope)

    out = {}
    for name, path, key, headers in json.loads(sys.argv[3]):
        try:
            auth = asyncio.run(m.user_api_key_auth(request(path, headers), key))
            out[name] = {"role": str(auth.user_role.value), "api_key": auth.api_key}
        except ProxyException as e:
            out[name] = {"code": str(e.code), "message": e.message, "type": getattr(e.type, "value", e.type)}
        except Exception as e:
            out[name] = {"exception": str(e)}
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.slow
def test_the_module_in_litellm_answers_as_litellm_does() -> None:
    """The whole hook, with LiteLLM's own types (its venv), on requests built as LiteLLM gets
    them: an accepted key is the proxy admin under the master key's alias, a refused one gets
    LiteLLM's own refusal (400 "No connected db."), public routes stay public, the probe names
    the generation."""
    python = litellm_bin().parent / "python"
    cases = [
        ("new", "/v1/model/info", NEW, []),
        ("old", "/provider/budgets", OLD, []),
        ("guess", "/v1/chat/completions", "mkt-guess", []),
        ("none", "/v1/models", None, []),
        ("root", "/", None, []),
        ("probe", "/v1/model/info", None, [("X-LLM-Agent-Auth-Probe", "1")]),
    ]
    digests = [sha(NEW), sha(OLD)]
    run = subprocess.run(
        [str(python), "-c", _IN_LITELLM, str(MODULE), json.dumps(digests), json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=240,
        env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, run.stderr[-3000:]
    out = json.loads(line.removeprefix("RESULT "))
    assert out["new"] == out["old"] == {"role": "proxy_admin", "api_key": "litellm_proxy_master_key"}
    assert out["guess"] == {"code": "400", "message": "No connected db.", "type": "no_db_connection"}
    assert out["none"] == {"exception": "No api key passed in."}
    assert out["root"]["role"] == "internal_user_viewer"
    assert out["probe"]["code"] == "401"
    assert out["probe"]["message"] == "llm-agent accepted keys generation " + bearer.generation(digests)
    assert NEW not in run.stdout + run.stderr and OLD not in run.stdout + run.stderr


# --------------------------------------------------------------------------- the passes


class StandIn(BaseHTTPRequestHandler):
    """The proxy as the reload check sees it, answering from the config on disk (every worker
    at once on the file's config): the auth probe with its generation, ``/v1/model/info`` with
    its deployment ids for a key it accepts, the refusal otherwise."""

    config: Path

    def do_GET(self) -> None:
        m, text = fleet_auth(), self.config.read_text()
        digests = list(proxy.accepted_digests(text))
        key = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        body: dict[str, Any]
        if self.headers.get(proxy.PROBE_HEADER):
            status, body = 401, {"error": {"message": m.GENERATION + m.generation(digests)}}
        elif m.accepted(key, digests):
            status, body = 200, {"data": [{"model_info": {"id": i}} for i in sorted(proxy.config_ids(text))]}
        else:
            status, body = 400, {"error": {"message": "No connected db."}}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stand_in(repo: Path, tmp_path: Path) -> Iterator[None]:
    """The stand-in on the port the repo gives the proxy."""
    StandIn.config = tmp_path / "state" / "stacks" / "motoko" / CONFIG
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    edit(repo / "hosts/motoko.yaml", "litellm_port: 8000", f"litellm_port: {server.server_address[1]}")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield
    server.shutdown()
    server.server_close()


def reasons(result: PassResult) -> dict[tuple[str, str], str]:
    return {(str(a.kind), a.target): a.reason for a in result.actions if a.kind is not ActionKind.NOOP}


def test_two_passes_rotate_the_key_with_an_overlap_and_the_plan_says_so(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch, stand_in: None
) -> None:
    s, engine = fake_settings("motoko", tmp_path, repo), FakeEngine(any_image=True)

    def run(token: str, dry: bool = False) -> PassResult:
        monkeypatch.setenv(EnvSecrets.var("litellm_bearer_token"), token)
        return reconcile_once(s, engine, commit="a" * 40, options=PassOptions(dry_run=dry), clock=FakeClock())

    first = run(OLD)
    assert first.result is PassOutcome.CONVERGED, first.error
    config = s.state_dir / "stacks" / first.project / CONFIG
    assert proxy.accepted_digests(config.read_text()) == (sha(OLD),)
    assert first.follow_up is None

    plan1 = run(NEW, dry=True)  # `agent plan` after the push of a new key
    assert plan1.result is PassOutcome.PENDING
    assert bearer.ROTATION_STARTED in reasons(plan1)[("reload", "litellm")]
    assert proxy.master_key(config.read_text()) == OLD, "a plan writes nothing"

    step1 = run(NEW)
    assert step1.result is PassOutcome.CONVERGED, step1.error
    assert step1.reload_check is not None and step1.reload_check["ok"], step1.reload_check
    assert step1.follow_up == bearer.ROTATION_FOLLOW_UP
    assert proxy.master_key(config.read_text()) == NEW
    assert proxy.accepted_digests(config.read_text()) == (sha(NEW), sha(OLD))

    plan2 = run(NEW, dry=True)
    assert bearer.ROTATION_FINISHED in reasons(plan2)[("reload", "litellm")]
    step2 = run(NEW)
    assert step2.result is PassOutcome.CONVERGED and step2.follow_up is None
    assert step2.reload_check is not None and step2.reload_check["ok"], step2.reload_check
    assert proxy.accepted_digests(config.read_text()) == (sha(NEW),)
    assert run(NEW, dry=True).result is PassOutcome.CONVERGED

    shown = json.dumps([r.as_dict() for r in (first, plan1, step1, plan2, step2)], default=str)
    assert OLD not in shown and NEW not in shown
    state = (s.state_dir / "state.json").read_text()
    assert OLD not in state and NEW not in state


def test_the_daemon_runs_the_second_step_at_once(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch, stand_in: None
) -> None:
    engine, source = FakeEngine(any_image=True), FakeSource()
    settings = fake_settings("motoko", tmp_path, repo)
    daemon = Daemon(
        settings,
        notifier=Notifier({}),
        engine_factory=lambda: engine,
        source=source,
        clock=FakeClock(),
        duties=NO_DUTIES,
    )
    source.push("a" * 40, repo)
    monkeypatch.setenv(EnvSecrets.var("litellm_bearer_token"), OLD)
    daemon.reconcile_job()
    config = next((settings.state_dir / "stacks").iterdir()) / CONFIG
    assert proxy.accepted_digests(config.read_text()) == (sha(OLD),)
    runs = len(json.loads((settings.state_dir / "state.json").read_text())["runs"])

    monkeypatch.setenv(EnvSecrets.var("litellm_bearer_token"), NEW)
    daemon.reconcile_job()  # one trigger (or one interval): both steps
    assert proxy.accepted_digests(config.read_text()) == (sha(NEW),), "the old key retired in the same job"
    assert len(json.loads((settings.state_dir / "state.json").read_text())["runs"]) == runs + 2


def test_the_auth_probe_tells_a_new_worker_from_old_ones() -> None:
    """``wait_generation`` against a stand-in answering as the module would."""
    m = fleet_auth()
    old, new = m.generation([sha(OLD)]), m.generation([sha(NEW), sha(OLD)])
    switch_at = time.monotonic() + 1.0

    class Workers(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            gen = new if time.monotonic() >= switch_at else old
            body = json.dumps({"error": {"message": m.GENERATION + gen, "code": "401"}}).encode()
            self.send_response(401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Workers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        early = proxy.wait_generation(url, new, 0.3)
        assert not early.ok and early.detail.startswith(proxy.OLD_KEYS)
        assert proxy.wait_generation(url, new, 5).ok
        assert time.monotonic() >= switch_at
    finally:
        server.shutdown()
        server.server_close()


def test_nothing_listening_is_said_at_once() -> None:
    began = time.monotonic()
    check = proxy.wait_generation(f"http://127.0.0.1:{free_port()}", "0" * 16, 10, silent_s=5)
    assert not check.ok and check.detail.startswith(proxy.NOT_LISTENING)
    assert time.monotonic() - began < 3


def test_agent_apply_runs_the_second_step_too(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``agent apply`` by hand does what the daemon does: a pass that began a rotation is
    followed by the next one in the same command."""
    from agent.cli.commands import main
    from agent.node import reconcile

    results = [
        PassResult(host="motoko", result=PassOutcome.CONVERGED, follow_up=bearer.ROTATION_FOLLOW_UP),
        PassResult(host="motoko", result=PassOutcome.CONVERGED),
    ]
    calls: list[str] = []

    def fake_pass(*args: object, **kwargs: object) -> PassResult:
        calls.append("pass")
        return results[len(calls) - 1]

    monkeypatch.setattr(reconcile, "reconcile_once", fake_pass)
    code = main(["apply", "--host", "motoko", "--repo", str(repo), "--state-dir", str(tmp_path / "state")])
    assert code == 0 and calls == ["pass", "pass"]
    assert bearer.ROTATION_FOLLOW_UP in capsys.readouterr().out
