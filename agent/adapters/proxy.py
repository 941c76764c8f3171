"""What the LiteLLM proxy on this host serves, over its HTTP API (httpx).

After a routing reload the agent checks that the proxy really serves the new routing: every
deployment of the config carries a ``model_info.id`` (``<alias>@<backend>``), and
``GET /v1/model/info`` lists the ids the proxy's router holds. Under gunicorn an old worker
may answer for a moment after SIGHUP, so ``wait_serving`` asks until the answer matches (or
the deadline passes). Every httpx error is mapped here to "not answered"; nothing escapes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Set
from dataclasses import dataclass
from typing import Any

import httpx
import yaml

from agent.core.bearer import ACCEPTED_KEYS_SETTING

#: A proxy whose API has not answered once in this many seconds is not waited for (its oldest
#: worker is retired). Longer than a worker's boot on a starved machine (measured: 20 s at load
#: 10 on two cores): a busy old worker that answers late must not be taken for a wedged one.
#: (The wedged workers first measured were blocked by a Hugging Face tokenizer fetch, now off:
#: ``disable_hf_tokenizer_download`` in the rendered config.)
SILENT_S = 30.0
#: After the oldest worker was retired, the rest must answer within this many seconds.
SILENT_AFTER_S = 15.0
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


def master_key(config_text: str) -> str | None:
    """The master key a LiteLLM config sets as a literal (``general_settings.master_key``);
    ``None`` when it sets none or refers to the environment (``os.environ/...``). The key of
    the config on disk is the one the proxy's workers hold once reloaded: after a rotation,
    the new one."""
    try:
        data = yaml.safe_load(config_text)
    except yaml.YAMLError:
        return None
    general = data.get("general_settings") if isinstance(data, dict) else None
    key = general.get("master_key") if isinstance(general, dict) else None
    if not isinstance(key, str) or not key or key.startswith("os.environ/"):
        return None
    return key


def accepted_digests(config_text: str) -> tuple[str, ...]:
    """The digests of the keys a LiteLLM config accepts through the role's auth module
    (``general_settings.llm_agent_accepted_key_sha256``), in order; empty when it lists none."""
    try:
        data = yaml.safe_load(config_text)
    except yaml.YAMLError:
        return ()
    general = data.get("general_settings") if isinstance(data, dict) else None
    entries = general.get(ACCEPTED_KEYS_SETTING) if isinstance(general, dict) else None
    return tuple(d for d in entries if isinstance(d, str) and _HEX.fullmatch(d)) if isinstance(entries, list) else ()


_HEX = re.compile(r"[0-9a-f]{64}")
#: The role's auth module answers a request with this header by a refusal naming the
#: generation of the keys it accepts (``fleet_auth.PROBE_HEADER``, ``GENERATION``).
PROBE_HEADER = "X-LLM-Agent-Auth-Probe"
_GENERATION = re.compile(r"llm-agent accepted keys generation ([0-9a-f]{16})")


def auth_generation(url: str, timeout_s: float = 2.0, client: httpx.Client | None = None) -> _Answer:
    """Ask a worker which keys it accepts (the generation of its list), with no key; on a new
    connection, so any worker may answer. ``generation`` is ``None`` for a worker on a config
    without the auth module (LiteLLM answers the probe as any keyless request)."""
    http = client or httpx.Client(timeout=timeout_s, trust_env=False)
    try:
        r = http.get(f"{url.rstrip('/')}/v1/model/info", headers={PROBE_HEADER: "1", "Connection": "close"})
        found = _GENERATION.search(r.text)
        return _Answer(answered=True, status=r.status_code, generation=found.group(1) if found else None)
    except httpx.ConnectError:
        return _Answer(refused=True)
    except httpx.HTTPError:
        return _Answer()
    finally:
        if client is None:
            http.close()


def served_ids(url: str, key: str, timeout_s: float = 5.0, client: httpx.Client | None = None) -> frozenset[str] | None:
    """The deployment ids the proxy serves now; ``None`` when it does not answer. Each ask is
    a new connection (``Connection: close``): a kept-alive one would always reach the same
    gunicorn worker, and the question is what *any* worker serves."""
    return _served(url, key, timeout_s, client).ids


#: A worker refused the key: during a rolling reload after a rotation, an old worker still
#: holding the previous master key (it answers, so the proxy is not silent).
KEY_REFUSED = "a worker refuses the master key (it still holds the previous one)"
#: How LiteLLM 1.108.7 refuses a key that is not its master key: without a database it looks
#: the key up as a virtual key and answers 400 ("No connected db"); 401/403 otherwise.
REFUSED_KEY_STATUS = frozenset({400, 401, 403})


@dataclass(frozen=True)
class _Answer:
    ids: frozenset[str] | None = None
    #: an HTTP answer came back (whatever its status): a worker is alive
    answered: bool = False
    #: the connection was refused: nothing listens on the port
    refused: bool = False
    status: int | None = None
    #: the auth module's generation, when the probe asked for it
    generation: str | None = None


def _served(url: str, key: str, timeout_s: float, client: httpx.Client | None) -> _Answer:
    """What one ask of ``/v1/model/info`` saw. A 502/503 made by the front proxy itself (its
    ``x-llm-front`` header) counts as refused: no LiteLLM container answers behind it."""
    http = client or httpx.Client(timeout=timeout_s, trust_env=False)
    try:
        headers = {"Authorization": f"Bearer {key}", "Connection": "close"}
        r = http.get(f"{url.rstrip('/')}/v1/model/info", headers=headers)
        if r.status_code != 200:
            if r.headers.get(FRONT_HEADER) in FRONT_UNREACHABLE:
                # The front proxy answered for LiteLLM: nothing listens behind it.
                return _Answer(refused=True)
            return _Answer(answered=True, status=r.status_code)
        data: Any = r.json().get("data", [])
        ids = frozenset(
            str(m["model_info"]["id"])
            for m in data
            if isinstance(m, dict) and isinstance(m.get("model_info"), dict) and "id" in m["model_info"]
        )
        return _Answer(ids, answered=True, status=200)
    except httpx.ConnectError:
        return _Answer(refused=True)
    except (ValueError, AttributeError):
        return _Answer(answered=True, status=200)  # a 200 that is not the model list
    except httpx.HTTPError:
        return _Answer()
    finally:
        if client is None:
            http.close()


def ready(url: str, timeout_s: float = 2.0) -> bool:
    try:
        return httpx.get(f"{url.rstrip('/')}/health/readiness", timeout=timeout_s, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def ready_within(url: str, window_s: float = 30.0, sleep: Callable[[float], None] = time.sleep) -> bool:
    """Whether the proxy says it is ready at least once within ``window_s`` (one slow answer on
    a loaded machine is not a dead proxy: a restart of a live one is an outage of a minute)."""
    end = time.monotonic() + window_s
    while True:
        if ready(url, timeout_s=5.0):
            return True
        if time.monotonic() >= end:
            return False
        sleep(2.0)


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
            a = _served(url, key, 2.0, http)
            if a.refused and not answered and silent_s is not None:
                # Nothing listens on the port (a gunicorn master holds it even while its
                # workers are wedged): no proxy to wait for, nor a worker to retire.
                return Serving(False, f"{NOT_LISTENING} ({url})", time.monotonic() - began)
            # Any HTTP answer counts: after a key rotation the old workers refuse the new key
            # (401) while the new worker boots; they are alive, not wedged.
            answered = answered or a.answered
            if not answered and silent_s is not None and time.monotonic() - began >= silent_s:
                return Serving(False, f"{SILENT} ({url})", time.monotonic() - began)
            if a.ids is not None and a.ids == expected:
                streak += 1
                if streak >= agreeing:
                    return Serving(True, "serving the new routing", time.monotonic() - began)
            else:
                streak = 0
                last = _what(expected, a)
            sleep(0.1)
    return Serving(False, last, time.monotonic() - began)


def wait_generation(
    url: str,
    generation: str,
    deadline_s: float,
    *,
    silent_s: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Serving:
    """Probe until a worker answers with ``generation`` (one on the new config: the old ones
    answer with theirs), or the deadline passes; ``silent_s`` as in ``wait_serving``."""
    began, answered, last = time.monotonic(), False, "no answer"
    with httpx.Client(timeout=2.0, trust_env=False) as http:
        while time.monotonic() - began < deadline_s:
            a = auth_generation(url, 2.0, http)
            if a.refused and not answered and silent_s is not None:
                return Serving(False, f"{NOT_LISTENING} ({url})", time.monotonic() - began)
            answered = answered or a.answered
            if not answered and silent_s is not None and time.monotonic() - began >= silent_s:
                return Serving(False, f"{SILENT} ({url})", time.monotonic() - began)
            if a.generation == generation:
                return Serving(True, "a worker accepts the new keys", time.monotonic() - began)
            if a.answered:
                last = f"{OLD_KEYS} (generation {a.generation or 'none'}, not {generation})"
            sleep(0.25)  # each probe is a refusal in the proxy's log: not ten a second
    return Serving(False, last, time.monotonic() - began)


#: Every worker that answered the probe still accepts the previous set of keys.
OLD_KEYS = "the workers accept the previous keys"


def rolling_reload(
    url: str,
    key: str,
    expected: Set[str],
    retire_old: Callable[[], None],
    deadline_s: float,
    generation: str | None = None,
) -> Serving:
    """Finish a rolling worker reload of the gunicorn proxy. The master got SIGTTIN: one more
    worker, which reads the config now on disk, while the old ones keep serving (SIGHUP stops
    every old worker at once and leaves the port to workers still booting: measured, p99 2 s
    at each reload under 10 req/s, against 0.3 s this way). Once a worker serves the new
    routing, ``retire_old`` sends SIGTTOU (one worker fewer: gunicorn stops the oldest,
    gracefully), and the proxy must then serve the new routing on every answer.

    ``key`` is the master key of the config being applied: after a rotation the old workers
    refuse it (401) and only a new worker can pass the first check, so the oldest is never
    retired before a worker holding the new key serves. ``generation``: the config changes
    the keys accepted (a rotation's two reloads), and the old workers may accept ``key`` too
    (the second one), so a new worker is told by its answer to the auth probe instead."""
    if generation is not None:
        first = wait_generation(url, generation, deadline_s, silent_s=SILENT_S)
    else:
        first = wait_serving(url, key, expected, deadline_s, agreeing=1, silent_s=SILENT_S)
    wedged = not first.ok and first.detail.startswith(SILENT)
    if not first.ok and not wedged:
        # The old workers answer with the old routing: the new one never came up (keep them).
        return Serving(False, f"no worker serves the new routing: {first.detail}", first.seconds)
    # Measured: a stream stalled after its headers wedges LiteLLM's worker (nothing answers,
    # not even /v1/model/info), so a silent proxy has its oldest worker retired too.
    retire_old()
    rest = wait_serving(url, key, expected, deadline_s, silent_s=SILENT_AFTER_S)
    note = f"{SILENT} for {first.seconds:.0f} s: retired the oldest worker; " if wedged else ""
    return Serving(rest.ok, note + rest.detail, first.seconds + rest.seconds)


def _what(expected: Set[str], a: _Answer) -> str:
    if a.ids is not None:
        return _diff(expected, a.ids)
    if a.status in REFUSED_KEY_STATUS:
        return KEY_REFUSED
    return f"answered {a.status}" if a.status is not None else "no answer"


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
