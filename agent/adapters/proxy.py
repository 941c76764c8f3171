"""What the LiteLLM proxy on this host serves, over its HTTP API (httpx).

After a routing reload the agent checks that the proxy really serves the new routing: every
deployment of the config carries a ``model_info.id`` (``<alias>@<backend>``), and
``GET /v1/model/info`` lists the ids the proxy's router holds. Under gunicorn an old worker
may answer for a moment after SIGHUP, so ``wait_serving`` asks until the answer matches (or
the deadline passes). Every httpx error is mapped here to "not answered"; nothing escapes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Set
from dataclasses import dataclass
from typing import Any

import httpx
import yaml

#: A proxy whose API has not answered once in this many seconds is not waited for.
SILENT_S = 5.0
SILENT = "the proxy API does not answer"
NOT_LISTENING = "nothing listens on the proxy's port"
#: Header of the answers the front proxy (HAProxy, roles/motoko haproxy.cfg) makes itself: no
#: LiteLLM container could be reached behind it. To the agent, that is a refused connection.
FRONT_HEADER = "x-llm-front"
#: Of those, the ones saying nothing answered behind the front (not a late answer: 504).
FRONT_UNREACHABLE = frozenset({"bad_gateway", "service_unavailable"})


@dataclass(frozen=True)
class Serving:
    ok: bool
    detail: str
    seconds: float


def config_ids(config_text: str) -> frozenset[str]:
    """The deployment ids a LiteLLM config declares."""
    try:
        data = yaml.safe_load(config_text)
    except yaml.YAMLError:
        return frozenset()
    models = data.get("model_list", []) if isinstance(data, dict) else []
    return frozenset(
        str(m["model_info"]["id"])
        for m in models
        if isinstance(m, dict) and isinstance(m.get("model_info"), dict) and "id" in m["model_info"]
    )


def served_ids(url: str, key: str, timeout_s: float = 5.0, client: httpx.Client | None = None) -> frozenset[str] | None:
    """The deployment ids the proxy serves now; ``None`` when it does not answer. Each ask is
    a new connection (``Connection: close``): a kept-alive one would always reach the same
    gunicorn worker, and the question is what *any* worker serves."""
    ids, _refused = _served(url, key, timeout_s, client)
    return ids


def _served(url: str, key: str, timeout_s: float, client: httpx.Client | None) -> tuple[frozenset[str] | None, bool]:
    """(ids or None, whether the connection was refused: nothing listens on the port, or
    the front proxy on it says no LiteLLM container answers behind it)."""
    http = client or httpx.Client(timeout=timeout_s, trust_env=False)
    try:
        headers = {"Authorization": f"Bearer {key}", "Connection": "close"}
        r = http.get(f"{url.rstrip('/')}/v1/model/info", headers=headers)
        if r.status_code != 200:
            # The front proxy answered for LiteLLM: nothing listens behind it.
            return None, r.headers.get(FRONT_HEADER) in FRONT_UNREACHABLE
        data: Any = r.json().get("data", [])
        return frozenset(
            str(m["model_info"]["id"])
            for m in data
            if isinstance(m, dict) and isinstance(m.get("model_info"), dict) and "id" in m["model_info"]
        ), False
    except httpx.ConnectError:
        return None, True
    except (httpx.HTTPError, ValueError, AttributeError):
        return None, False
    finally:
        if client is None:
            http.close()


def ready(url: str, timeout_s: float = 2.0) -> bool:
    try:
        return httpx.get(f"{url.rstrip('/')}/health/readiness", timeout=timeout_s, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def wait_serving(
    url: str,
    key: str,
    expected: Set[str],
    deadline_s: float,
    *,
    agreeing: int = 3,
    sleep: Callable[[float], None] = time.sleep,
    silent_s: float | None = None,
) -> Serving:
    """Ask until ``agreeing`` answers in a row list exactly ``expected`` (one old worker's
    answer is not enough to say the reload is done), or the deadline passes; with
    ``silent_s``, give up early when nothing at all has answered for that long."""
    began = time.monotonic()
    streak, last, answered = 0, "no answer", False
    with httpx.Client(timeout=2.0, trust_env=False) as http:
        while time.monotonic() - began < deadline_s:
            ids, refused = _served(url, key, 2.0, http)
            if refused and not answered and silent_s is not None:
                # Nothing listens on the port (a gunicorn master holds it even while its
                # workers are wedged): no proxy to wait for, nor a worker to retire.
                return Serving(False, f"{NOT_LISTENING} ({url})", time.monotonic() - began)
            answered = answered or ids is not None
            if not answered and silent_s is not None and time.monotonic() - began >= silent_s:
                return Serving(False, f"{SILENT} ({url})", time.monotonic() - began)
            if ids is not None and ids == expected:
                streak += 1
                if streak >= agreeing:
                    return Serving(True, "serving the new routing", time.monotonic() - began)
            else:
                streak = 0
                last = "no answer" if ids is None else _diff(expected, ids)
            sleep(0.1)
    return Serving(False, last, time.monotonic() - began)


def rolling_reload(
    url: str, key: str, expected: Set[str], retire_old: Callable[[], None], deadline_s: float
) -> Serving:
    """Finish a rolling worker reload of the gunicorn proxy. The master got SIGTTIN: one more
    worker, which reads the config now on disk, while the old ones keep serving (SIGHUP stops
    every old worker at once and leaves the port to workers still booting: measured, p99 2 s
    at each reload under 10 req/s, against 0.3 s this way). Once a worker serves the new
    routing, ``retire_old`` sends SIGTTOU (one worker fewer: gunicorn stops the oldest,
    gracefully), and the proxy must then serve the new routing on every answer."""
    first = wait_serving(url, key, expected, deadline_s, agreeing=1, silent_s=SILENT_S)
    wedged = not first.ok and first.detail.startswith(SILENT)
    if not first.ok and not wedged:
        # The old workers answer with the old routing: the new one never came up (keep them).
        return Serving(False, f"no worker serves the new routing: {first.detail}", first.seconds)
    # Measured: a stream stalled after its headers wedges LiteLLM's worker (nothing answers,
    # not even /v1/model/info), so a silent proxy has its oldest worker retired too.
    retire_old()
    rest = wait_serving(url, key, expected, deadline_s, silent_s=3 * SILENT_S)
    note = f"{SILENT} for {first.seconds:.0f} s: retired the oldest worker; " if wedged else ""
    return Serving(rest.ok, note + rest.detail, first.seconds + rest.seconds)


def _diff(expected: Set[str], ids: Set[str]) -> str:
    missing, extra = sorted(expected - ids), sorted(ids - expected)
    parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"still {', '.join(extra)}"] if extra else [])
    return "; ".join(parts) or "same"


def provider_spend(url: str, key: str, provider: str = "openai", timeout_s: float = 2.0) -> dict[str, Any] | None:
    """The proxy's spend against its ``provider`` budget: ``{budget_usd, spent_usd, period,
    reset_at}``; ``None`` when it does not answer, or has no budget for that provider.

    LiteLLM's ``GET /provider/budgets`` (master key) reads the router's provider budget
    limiter, i.e. its cache (Redis here): no database is needed. A provider with nothing spent
    yet in the period reads 0.0.
    """
    try:
        r = httpx.get(
            f"{url.rstrip('/')}/provider/budgets",
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout_s,
            trust_env=False,
        )
        if r.status_code != 200:
            return None
        entry = r.json()["providers"][provider]
        spend, budget = entry.get("spend"), entry.get("budget_limit")
        return {
            "budget_usd": float(budget) if isinstance(budget, int | float) else None,
            "spent_usd": float(spend) if isinstance(spend, int | float) else 0.0,
            "period": str(entry.get("time_period") or ""),
            "reset_at": entry.get("budget_reset_at"),
        }
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return None
