"""Probes of a vLLM OpenAI-compatible server over HTTP (httpx): ``/health``, ``/v1/models``, a
one-token streamed canary, and ``/metrics``. Every check is bounded by the probe timeout, so a
backend that accepts and never answers, or stalls after its headers, fails within it. Every
httpx error is mapped here onto a failed ``Check`` with its reason; nothing escapes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx

from agent.core.health import BackendHealth, Check, Load, parse_vllm_load

CANARY = {"messages": [{"role": "user", "content": "ping"}], "max_tokens": 1, "stream": True, "temperature": 0}


def probe_backend(
    api_base: str, served_name: str, timeout_s: float = 2.0, client: httpx.Client | None = None
) -> BackendHealth:
    """Probe the vLLM whose OpenAI API is at ``api_base`` (``http://host:port/v1``)."""
    own = client is None
    http = client or httpx.Client(timeout=httpx.Timeout(timeout_s), follow_redirects=False)
    root = api_base.rstrip("/").removesuffix("/v1")
    try:
        health = _check("health", lambda: _health(http, root))
        if not health.ok:  # one timeout is enough: a probe round stays within its bound
            skipped = [Check(name=n, ok=False, detail="not tried: /health failed") for n in ("models", "canary")]
            return BackendHealth(checks=(health, *skipped))
        models = _check("models", lambda: _models(http, api_base, served_name))
        canary = (
            _check("canary", lambda: _canary(http, api_base, served_name, timeout_s))
            if models.ok  # a stalled API costs one timeout, not two: the round stays short
            else Check(name="canary", ok=False, detail="not tried: /v1/models failed")
        )
        checks = [health, models, canary]
        load = Load()
        metrics = _check("metrics", lambda: _metrics(http, root))
        if metrics.ok:
            load = parse_vllm_load(metrics.detail)
            metrics = metrics.model_copy(update={"detail": f"running {load.running}, waiting {load.waiting}"})
        return BackendHealth(checks=(*checks, metrics), load=load)
    finally:
        if own:
            http.close()


def _check(name: str, run: Callable[[], str]) -> Check:
    start = time.monotonic()
    try:
        detail = run()
        ok = True
    except _Failed as exc:
        detail, ok = str(exc), False
    except httpx.TimeoutException:
        detail, ok = "timed out", False
    except httpx.HTTPError as exc:
        detail, ok = f"{type(exc).__name__}: {exc}"[:200], False
    return Check(name=name, ok=ok, detail=detail, ms=round((time.monotonic() - start) * 1000, 1))


class _Failed(Exception):
    pass


def _health(http: httpx.Client, root: str) -> str:
    r = http.get(f"{root}/health")
    if r.status_code != 200:
        raise _Failed(f"HTTP {r.status_code}")
    return "HTTP 200"


def _models(http: httpx.Client, api_base: str, served_name: str) -> str:
    r = http.get(f"{api_base.rstrip('/')}/models")
    if r.status_code != 200:
        raise _Failed(f"HTTP {r.status_code}")
    try:
        ids = [m.get("id") for m in r.json().get("data", []) if isinstance(m, dict)]
    except (ValueError, AttributeError):
        raise _Failed("not an OpenAI model list") from None
    if served_name not in ids:
        raise _Failed(f"serves {ids}, not '{served_name}'")
    return served_name


def _canary(http: httpx.Client, api_base: str, served_name: str, timeout_s: float) -> str:
    """The first streamed token within the timeout (a stall after the headers fails)."""
    deadline = time.monotonic() + timeout_s
    body = {**CANARY, "model": served_name}
    with http.stream("POST", f"{api_base.rstrip('/')}/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise _Failed(f"HTTP {r.status_code}")
        for line in r.iter_lines():
            if time.monotonic() > deadline:
                break
            if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]"):
                try:
                    json.loads(line[5:])
                except ValueError:
                    raise _Failed("not a server-sent event stream") from None
                return "first token in time"
    raise _Failed(f"no token within {timeout_s:g}s")


def _metrics(http: httpx.Client, root: str) -> str:
    r = http.get(f"{root}/metrics")
    if r.status_code != 200:
        raise _Failed(f"HTTP {r.status_code}")
    return r.text


#: ``read_load``: nothing listens on the port (a vLLM that is down has nothing in flight).
DOWN = "not listening"


def read_load(api_base: str, timeout_s: float = 2.0) -> Load | str:
    """Requests running and waiting on the vLLM at ``api_base``, from its ``/metrics``; else why
    not: ``DOWN`` when nothing listens, another reason (a timeout: a busy server still has
    requests in flight) otherwise."""
    root = api_base.rstrip("/").removesuffix("/v1")
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout_s), follow_redirects=False, trust_env=False) as http:
            return parse_vllm_load(_metrics(http, root))
    except httpx.ConnectError:
        return DOWN
    except httpx.TimeoutException:
        return "timed out"
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    except _Failed as exc:
        return str(exc)
