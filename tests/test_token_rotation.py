"""A bearer-token rotation is a config change, reloaded worker by worker: no new container.

The gateway's master key (``litellm_bearer_token``) is rendered into the 0600 proxy config
(``general_settings.master_key``), not into the container's environment: a rotation pushed as a
newly encrypted secret changes only ``config/config.yaml``, which the role reloads in place
(``signal:SIGTTIN``: one more gunicorn worker on the new config, then SIGTTOU retires the
oldest once a worker serves it; ``agent.adapters.proxy.rolling_reload``).

The unit test plans a token-only change against what the previous render applied. The slow one
rotates the key of the real LiteLLM proxy (1.108.7, gunicorn, Redis) under load in the two
reloads the agent does (``agent.core.bearer``; tests/test_bearer_rotation.py has the rule and
the passes): the first config holds the new master key and accepts both keys through the
role's auth module, the second accepts the new key alone. Each step does what a pass does:
render with the key on disk as the previous one, replace the file by rename, SIGTTIN,
``rolling_reload`` told the generation of the new list of keys.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from agent.adapters import proxy
from agent.adapters.fs import write_atomic
from agent.adapters.secrets import EnvSecrets, SecretResolver
from agent.cli.commands import main
from agent.core import bearer
from agent.core.observed import Observed, ObservedContainer
from agent.core.outcomes import ActionKind
from agent.core.plan import container_labels, container_name, desired_service, network_name, plan
from agent.core.rendered import RenderedStack
from agent.desired.load import load_desired
from agent.desired.render import render_host
from tests.conftest import DEMO_IDENTITY
from tests.gatewaykit import Load, failed, pct, window
from tests.proxykit import Proc
from tests.test_litellm_proxy import TOKEN, start_stack
from tests.test_litellm_resilience import stop_all
from tests.test_validate import edit

CONFIG = "config/config.yaml"
OLD, NEW = "mkt-old-token-0123456789abcdef", "mkt-new-token-fedcba9876543210"


def rendered_with(repo: Path, token: str, monkeypatch: pytest.MonkeyPatch) -> RenderedStack:
    monkeypatch.setenv(EnvSecrets.var("litellm_bearer_token"), token)
    resolver = SecretResolver.for_repo(repo, identity=DEMO_IDENTITY)
    return render_host(load_desired(repo), "motoko", resolver, reveal=True)


def applied(rendered: RenderedStack) -> Observed:
    """The engine as the agent leaves it after applying ``rendered``: every service running,
    labelled with what was applied (spec and files hashes)."""
    stack = rendered.stack
    images = {img: f"sha256:{i}" for i, img in enumerate(sorted({s.image for s in stack.services.values()}))}
    containers = tuple(
        ObservedContainer(
            id=f"id-{name}",
            name=container_name(stack, name),
            image_id=images[svc.image],
            labels=container_labels(stack, desired_service(stack, name, images[svc.image]), "motoko", "c0"),
            created="2026-11-26T09:00:00Z",
        )
        for name, svc in stack.services.items()
    )
    nets = tuple(network_name(stack, n) for s in stack.services.values() for n in s.networks)
    return Observed(containers=containers, networks=nets, owned_networks=nets, images=images)


def test_a_token_only_change_is_a_rolling_reload_not_a_new_container(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before, after = rendered_with(repo, OLD, monkeypatch), rendered_with(repo, NEW, monkeypatch)
    # The key is in the 0600 proxy config, and nowhere else.
    config = after.stack.files[CONFIG]
    assert proxy.master_key(config.content) == NEW and config.secret and config.mode == 0o600
    assert "LITELLM_MASTER_KEY" not in after.stack.files["litellm.env"].content
    assert NEW not in after.stack.files["litellm.env"].content and NEW not in after.compose
    # Only the config differs: the container's environment and spec stay as they are.
    assert before.stack.files["litellm.env"] == after.stack.files["litellm.env"]
    assert before.compose == after.compose

    policy = load_desired(repo).roles["motoko"].spec.on_config_change
    observed = applied(before)
    assert {a.kind for a in plan(before.stack, observed, policy)} == {ActionKind.NOOP}, "control: converged"
    actions = plan(after.stack, observed, policy)
    changed = [a for a in actions if a.kind is not ActionKind.NOOP]
    assert [(a.kind, a.target, a.signal, a.changed) for a in changed] == [
        (ActionKind.RELOAD, "litellm", "SIGTTIN", (CONFIG,))
    ], "\n".join(map(str, actions))
    assert all(OLD not in str(a.as_dict()) and NEW not in str(a.as_dict()) for a in actions)


# --------------------------------------------------------------------------- the real proxy


@pytest.fixture
def stack(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_port: int) -> Iterator[dict[str, Proc]]:
    procs = start_stack(repo, tmp_path, monkeypatch, redis_port, gunicorn=True)
    yield procs
    stop_all(procs)


def refused(status: int) -> bool:
    """LiteLLM 1.108.7 without a database answers 400 ("No connected db") to a key that is not
    its master key: it looks it up as a virtual key."""
    return status in proxy.REFUSED_KEY_STATUS


def status_with(port: int, key: str) -> int:
    """``/v1/models`` with ``key`` on a new connection (any worker may take it)."""
    r = httpx.get(
        f"http://127.0.0.1:{port}/v1/models",
        headers={"Authorization": f"Bearer {key}", "Connection": "close"},
        timeout=10,
        trust_env=False,
    )
    return r.status_code


def rotation_step(
    repo: Path, monkeypatch: pytest.MonkeyPatch, config: Path, master: int, url: str
) -> tuple[proxy.Serving, float, float]:
    """One pass's part of a rotation, as ``Pass`` does it: render with the config on disk's
    key as the previous one, replace the file by rename, SIGTTIN, ``rolling_reload`` told the
    generation of the new list of keys (a new worker is known by it), SIGTTOU."""
    previous = proxy.master_key(config.read_text())
    monkeypatch.setenv(EnvSecrets.var("litellm_bearer_token"), NEW)
    resolver = SecretResolver.for_repo(repo, identity=DEMO_IDENTITY)
    rendered = render_host(load_desired(repo), "motoko", resolver, reveal=True, previous_master_key=previous)
    text = rendered.stack.files[CONFIG].content
    write_atomic(config, text.encode(), 0o600)
    generation = bearer.generation(list(proxy.accepted_digests(text)))
    began = time.monotonic()

    def retire() -> None:
        os.kill(master, signal.SIGTTOU)

    os.kill(master, signal.SIGTTIN)
    check = proxy.rolling_reload(url, NEW, proxy.config_ids(text), retire, 60, generation)
    return check, began, time.monotonic()


def _backend_cooldown(by: str) -> bool:
    """LiteLLM's answer when the fake backends failed or were cooled down (not the proxy's)."""
    return by.startswith(("429:", "500:")) and ("cooldown" in by or "Connection" in by or "Timeout" in by)


def statuses(port: int, key: str, n: int = 6) -> set[int]:
    return {status_with(port, key) for _ in range(n)}


@pytest.mark.slow
def test_a_rotation_in_two_reloads_costs_no_request(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stack: dict[str, Proc]
) -> None:
    """Under load, clients on the old token until the first reload is complete, then on the
    new one: no request fails; afterwards the old token is refused, the new one accepted, by
    the same master process."""
    gw = stack["proxy"]
    master, url = gw.proc.pid, f"http://127.0.0.1:{gw.port}"
    config = tmp_path / "rendered" / CONFIG
    # The proxy reads the key from its config file (a literal, not os.environ/), and checks
    # keys through the role's auth module next to it.
    assert proxy.master_key(config.read_text()) == TOKEN
    assert (config.parent / "fleet_auth.py").is_file()
    assert statuses(gw.port, TOKEN) == {200} and all(refused(s) for s in statuses(gw.port, NEW, 2))

    load = Load(gw.port, TOKEN).start()
    try:
        time.sleep(2)
        one, began1, done1 = rotation_step(repo, monkeypatch, config, master, url)
        assert proxy.accepted_digests(config.read_text()) == (bearer.key_digest(NEW), bearer.key_digest(TOKEN))
        # Every worker now accepts both keys: the clients switch.
        both = (statuses(gw.port, TOKEN), statuses(gw.port, NEW))
        load.token = NEW
        time.sleep(2)
        two, began2, done2 = rotation_step(repo, monkeypatch, config, master, url)
        assert proxy.accepted_digests(config.read_text()) == (bearer.key_digest(NEW),)
        time.sleep(2)
    finally:
        outcomes = load.stop()
    during1, during2 = window(outcomes, began1, done1), window(outcomes, began2, done2)
    bad = failed(outcomes)
    print(
        f"rotation: step 1 {one.detail!r} in {one.seconds:.1f} s, {len(during1)} requests, p99 "
        f"{pct([o.seconds for o in during1], 99):.3f} s; step 2 {two.detail!r} in {two.seconds:.1f} s, "
        f"{len(during2)} requests, p99 {pct([o.seconds for o in during2], 99):.3f} s; {len(outcomes)} requests "
        f"in all, p99 {pct([o.seconds for o in outcomes], 99):.3f} s, resent {sum(o.resent for o in outcomes)}; "
        f"failed {len(bad)} ({sorted({o.status or 0 for o in bad})} at "
        f"{[round(o.at - began1, 1) for o in bad][:10]} s from step 1)"
    )
    assert one.ok, one.detail
    assert two.ok, two.detail
    assert during1 and during2, "the load ran through both reloads"
    assert both == ({200}, {200}), f"between the steps every worker accepts both keys: {both}"
    # No request is refused for its key: the clients' token (old, then new) is accepted by
    # every worker it meets, old or new, throughout. (The 400s this used to count: 6 of 116.)
    assert not [o for o in bad if refused(o.status or 0)], [(round(o.at - began1, 1), o.status) for o in bad][:10]
    # Nor fails for the reloads themselves (a connection error, a 5xx, a timeout). On a starved
    # machine (load 10 on two cores) the fake backends time out and LiteLLM cools them down
    # (500/429, before a reload as during one): those are the backends', not the rotation's,
    # so they are told apart by their answer, never by when they happened.
    assert not [o for o in bad if not _backend_cooldown(o.by)], [(round(o.at - began1, 1), o.by) for o in bad][:5]
    assert all(refused(s) for s in statuses(gw.port, TOKEN)), "the old token is refused after the rotation"
    assert statuses(gw.port, NEW) == {200}
    for route in ("/health/liveliness", "/health/readiness"):
        assert httpx.get(url + route, timeout=10, trust_env=False).status_code == 200, route
    assert gw.proc.poll() is None and gw.proc.pid == master, "reloaded, never restarted"


# --------------------------------------------------------------------------- the serving check


class _Workers(BaseHTTPRequestHandler):
    """Old workers refuse the new key (400, as LiteLLM without a database) until ``switch_at``;
    then a new worker serves ``ids`` with it."""

    switch_at = 0.0
    ids: tuple[str, ...] = ()

    def do_GET(self) -> None:
        new = time.monotonic() >= self.switch_at
        ok = new and self.headers.get("Authorization") == f"Bearer {NEW}"
        body = json.dumps({"data": [{"model_info": {"id": i}} for i in self.ids]} if ok else {"error": "no db"})
        self.send_response(200 if ok else 400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


def test_old_workers_refusing_the_new_key_are_waited_for_not_taken_for_wedged(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a rotation the old workers answer the new key with a refusal while the new worker
    boots: they answer, so the oldest is not retired as if the proxy were silent (it would leave
    no worker serving), and the detail says why it waits."""
    monkeypatch.setattr(proxy, "SILENT_S", 0.5)
    _Workers.switch_at, _Workers.ids = time.monotonic() + 1.5, ("local/chat@armitage",)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Workers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    retired: list[float] = []
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        began = time.monotonic()
        check = proxy.rolling_reload(url, NEW, {"local/chat@armitage"}, lambda: retired.append(time.monotonic()), 10)
        assert check.ok, check.detail
        assert retired and retired[0] >= _Workers.switch_at, "retired only once a worker holds the new key"
        assert time.monotonic() - began >= 1.5
        early = proxy.wait_serving(url, OLD, {"local/chat@armitage"}, 0.5)
        assert not early.ok and early.detail == proxy.KEY_REFUSED
    finally:
        server.shutdown()
        server.server_close()


def test_a_proxy_config_without_a_master_key_is_refused(
    repo: Path, roles_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """LiteLLM 1.108.7 refuses to start without a master key: ``agent validate`` says so first."""
    edit(
        roles_copy / "motoko/templates/litellm.config.yaml.j2",
        'litellm_config | with_master_key(litellm_bearer_token, custom_auth="fleet_auth.user_api_key_auth") | to_yaml',
        "litellm_config | to_yaml",
    )
    assert main(["validate", "--repo", str(repo)]) != 0
    assert "no master key" in capsys.readouterr().out
