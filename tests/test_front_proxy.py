"""The front proxy (HAProxy) before LiteLLM, without Docker: the agent reads the front's own
"nothing behind me" answers as a refused connection, and the front's timeouts follow routing.
(The proxy under load, on the real engine: tests/test_gateway_changes.py.)"""

from __future__ import annotations

import httpx
import pytest

from agent.adapters import proxy
from agent.core.model import RoutingPolicy
from agent.core.routing import front_timeout_s, graceful_shutdown_s

FRONT_503 = httpx.Response(503, headers={proxy.FRONT_HEADER: "service_unavailable"}, json={"error": {}})


def served(answer: httpx.Response) -> tuple[frozenset[str] | None, bool]:
    """(ids, refused) of one ask answered ``answer``."""
    with httpx.Client(transport=httpx.MockTransport(lambda request: answer)) as client:
        seen = proxy._served("http://front", "key", 1.0, client)
        return seen.ids, seen.refused


def test_the_fronts_own_unavailable_answer_counts_as_nothing_listening() -> None:
    assert served(FRONT_503) == (None, True)
    bad = httpx.Response(502, headers={proxy.FRONT_HEADER: "bad_gateway"})
    assert served(bad) == (None, True)
    # A late answer is not "nothing there"; nor is LiteLLM's own error (no front header).
    assert served(httpx.Response(504, headers={proxy.FRONT_HEADER: "gateway_timeout"})) == (None, False)
    assert served(httpx.Response(503, json={"error": "litellm"})) == (None, False)
    ok = httpx.Response(200, json={"data": [{"model_info": {"id": "local/chat@armitage"}}]})
    assert served(ok) == (frozenset({"local/chat@armitage"}), False)


def test_a_reload_check_behind_a_front_with_no_litellm_ends_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return FRONT_503

    transport = httpx.MockTransport(answer)
    real = httpx.Client

    def client(**kw: object) -> httpx.Client:
        return real(transport=transport)

    monkeypatch.setattr(httpx, "Client", client)
    check = proxy.wait_serving("http://front", "key", {"x"}, 30, silent_s=5, sleep=lambda s: None)
    assert not check.ok and check.detail.startswith(proxy.NOT_LISTENING), check
    assert len(calls) == 1


def test_the_front_waits_for_the_longest_fallback_chain() -> None:
    default = RoutingPolicy()
    # local/chat -> local/reasoner -> openai/strong: three models, 120 s each, + 30 s
    assert front_timeout_s(default) == 3 * 120 + 30
    assert front_timeout_s(default) > graceful_shutdown_s(default)
    short = RoutingPolicy(fallbacks={}, timeout_s=20, stream_timeout_s=10)
    assert front_timeout_s(short) == 20 + 30
