"""Each layer that guards a promise has its own test: regressions a reviewer made by hand and
the suite did not notice (log redaction, the compose leak check, the reload rollback, routing)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import structlog
import yaml

from agent.core.errors import DesiredStateError
from agent.core.model import RoutingPolicy
from agent.core.plan import container_labels, desired_service, plan
from agent.core.routing import Backend, Health, decide
from agent.core.stack import StackFile, StackSpec, parse_compose
from agent.core.yamlsrc import load
from agent.daemon import logs
from agent.desired.render import _refuse_leaks
from agent.node.executor import Executor, Rollout
from agent.testing.fakes import FakeClock, FakeEngine


def test_log_lines_are_redacted_by_the_log_layer_itself() -> None:
    out = io.StringIO()
    redactor = logs.configure(stream=out, json=True)
    redactor.add("sk-canary-abcdef")
    structlog.get_logger("t").info("calling", detail="key=sk-canary-abcdef", nested={"k": "sk-canary-abcdef"})
    line = json.loads(out.getvalue().splitlines()[-1])
    assert "sk-canary-abcdef" not in out.getvalue()
    assert line["detail"] == "key=**REDACTED**"


class _Values:
    def __init__(self, *values: str) -> None:
        self.values = list(values)

    def declared(self, name: str) -> bool:
        return True

    def where(self, name: str) -> str:
        return "test"

    def value(self, name: str) -> str:
        return self.values[0]

    def known_values(self) -> list[str]:
        return self.values


def test_the_compose_leak_check_refuses_a_value_that_got_through() -> None:
    """The backstop behind secret confinement: a value in the compose text or a non-secret file."""
    secret_file = {"litellm.env": StackFile(path="litellm.env", content="K=sk-canary-1234", secret=True)}
    _refuse_leaks(_Values("sk-canary-1234"), secret_file, "services: {}", "compose")  # fine
    with pytest.raises(DesiredStateError, match="a secret value would be written here"):
        _refuse_leaks(_Values("sk-canary-1234"), {}, "environment: {K: sk-canary-1234}", "compose")
    plain = {"config.yaml": StackFile(path="config.yaml", content="key: sk-canary-1234")}
    with pytest.raises(DesiredStateError, match="a secret value would be written here"):
        _refuse_leaks(_Values("sk-canary-1234"), plain, "services: {}", "compose")


def _proxy(conf: str) -> StackSpec:
    doc = {
        "services": {
            "proxy": {
                "image": "proxy:1",
                "volumes": ["./conf:/conf:ro"],
                "healthcheck": {"test": ["CMD", "true"], "interval": "1s", "retries": 1},
            }
        }
    }
    files = {"conf/c.yaml": StackFile(path="conf/c.yaml", content=conf)}
    return parse_compose(load(yaml.safe_dump(doc), "t"), "p", files)


def test_a_failed_reload_puts_the_old_mounted_files_back(tmp_path: Path) -> None:
    engine = FakeEngine({"proxy:1": "sha256:p"})
    old = _proxy("routing: old\n")
    cid = engine.add(
        "p-proxy-1", container_labels(old, desired_service(old, "proxy", "sha256:p"), "h", "c0"), "proxy:1"
    )
    engine.ensure_network("p_default", "p", "default", "bridge")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "c.yaml").write_text("routing: old\n")

    def die(target: str) -> None:  # the proxy dies on the signal (a config it cannot load)
        engine.containers[cid].state = "exited"

    engine.on("signal", die)
    seen: list[str] = []  # what the proxy finds mounted when it is restarted
    engine.on("restart", lambda target: seen.append((tmp_path / "conf" / "c.yaml").read_text()))
    new = _proxy("routing: new\n")
    actions = plan(new, engine.observe("p", ["proxy:1"]), {"proxy": "signal:SIGHUP"})
    assert [a.kind for a in actions] == ["reload"]
    result = Executor(engine, tmp_path, Rollout("h", "c1"), FakeClock()).apply(new, actions)
    assert not result.ok and "old files restored" in (result.error or "")
    assert (tmp_path / "conf" / "c.yaml").read_text() == "routing: old\n"
    assert engine.ops("restart") == [cid]
    assert seen == ["routing: old\n"], "restarted on the old files"


def _table() -> list[Backend]:
    return [
        Backend("armitage", "local/chat", "vllm", "hosted_vllm/q", "http://armitage:8000/v1", "armitage"),
        Backend("wintermute", "local/reasoner", "vllm", "hosted_vllm/l", "http://wintermute:8000/v1", "wintermute"),
        Backend("openai-strong", "openai/strong", "openai", "openai/gpt", None, None),
        Backend("openai-cheap", "openai/cheap", "openai", "openai/mini", None, None),
    ]


def test_decide_follows_the_fallback_chain_and_the_budget() -> None:
    policy = RoutingPolicy()
    table = _table()
    healthy = decide(policy, table)
    assert {a: d.backend.name for a, d in healthy.items()}["local/chat"] == "armitage"
    assert not healthy["local/chat"].degraded
    down = decide(policy, table, {"armitage": Health(False, "3 failed probes")})
    assert down["local/chat"].backend.name == "wintermute" and down["local/chat"].degraded
    assert "3 failed probes" in down["local/chat"].reason
    both = decide(policy, table, {"armitage": Health(False), "wintermute": Health(False)})
    assert both["local/chat"].backend.name == "openai-strong"
    assert both["local/reasoner"].backend.name == "openai-strong"
    broke = decide(policy, table, budget_exceeded=True)
    assert broke["openai/strong"].backend.name == "armitage" and broke["openai/cheap"].backend.name == "armitage"
    none = decide(
        policy, table, {"armitage": Health(False), "wintermute": Health(False), "openai-strong": Health(False)}
    )
    assert none["local/chat"].backend.name == "armitage" and "no healthy fallback" in none["local/chat"].reason


def test_a_reworded_routing_reason_does_not_change_the_proxy_config(repo: Path) -> None:
    """Reasons go to status, never into the hashed config: rewording one is not a reload."""
    from agent.adapters.secrets import SecretResolver
    from agent.desired.load import load_desired
    from agent.desired.render import render_host
    from tests.conftest import DEMO_IDENTITY

    desired = load_desired(repo)
    resolver = SecretResolver.for_repo(repo, identity=DEMO_IDENTITY)
    one = render_host(desired, "motoko", resolver, health={"armitage": Health(False, "timeout after 5s")})
    two = render_host(desired, "motoko", resolver, health={"armitage": Health(False, "connection refused")})
    assert one.stack.files["config/config.yaml"].content == two.stack.files["config/config.yaml"].content
    assert one.decisions["local/chat"].reason != two.decisions["local/chat"].reason
