"""Routing: which backend serves each alias, and the LiteLLM config that says so.

Pure functions of the desired state, the routing policy and the fleet's health (until the
fleet reports health, every backend counts as healthy):

- ``backends(desired)``: every backend the fleet declares, with the alias it natively serves;
- ``decide(policy, backends, health, budget_exceeded)``: for each alias, the backend serving
  it now and why (the first healthy entry of its fallback chain);
- ``litellm_config(desired, decisions)``: the proxy's config, built to the measured facts in
  ``shared/notes/litellm.md`` (``hosted_vllm/`` for local models, no ``allowed_fails``,
  ``num_retries: 0``, budget via ``provider_budget_config`` backed by Redis; the master key is
  not here: the role's template adds it, ``with_master_key``, into the 0600 file, so a rotated
  key is a config reload, not a new container environment) and resilient by itself: each
  alias one model group holding its chain as ordered deployments, a per-deployment cooldown
  policy, background health checks with routing (never on paid models), separate
  ``timeout``/``stream_timeout``, and each local deployment's ``max_input_tokens`` from the
  one context rule (``local_input_limit``).

A change of routing is a change of the rendered config, which the gateway role reloads in
place (SIGHUP), never restarting the proxy. The config holds which backend serves each alias,
never *why*: reasons go to status and logs, so a reworded reason is not a reload.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from agent.core.errors import Problem
from agent.core.model import REQUIRED_ALIASES, Fleet, Host, RoutingPolicy, loopback_problem

BackendKind = Literal["vllm", "embedding", "openai"]


@dataclass(frozen=True, slots=True)
class Backend:
    """One deployment the proxy can send requests to."""

    name: str  # "armitage", "motoko-embed", "openai-strong"
    alias: str  # the alias it natively serves
    kind: BackendKind
    model: str  # LiteLLM model string: hosted_vllm/<served name>, openai/<model>
    api_base: str | None
    host: str | None  # the gpu_node host behind it, if any
    max_model_len: int | None = None
    file: str = ""  # where it was declared, for lint messages
    line: int | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    alias: str
    backend: Backend  # the one serving the alias now (the first of ``chain``)
    reason: str
    #: The deployments of the alias's model group, in order of preference: the serving one,
    #: then the rest of its fallback chain that is not known to be down. LiteLLM tries the
    #: next one within the same request when one fails.
    chain: tuple[Backend, ...] = ()
    #: False: no entry of the alias's chain is usable; ``backend`` is kept in the config (a
    #: model group needs a deployment) but the alias is explicitly unavailable.
    available: bool = True

    @property
    def deployments(self) -> tuple[Backend, ...]:
        return self.chain or (self.backend,)

    @property
    def degraded(self) -> bool:
        return self.backend.alias != self.alias


@dataclass(frozen=True, slots=True)
class Health:
    healthy: bool
    reason: str = ""


def backends(fleet: Fleet, hosts: Mapping[str, Host], line_of: Any = None) -> tuple[list[Backend], list[Problem]]:
    """All backends of the fleet; problems for overrides that name no gpu_node host.

    ``line_of(host, *path)`` (optional) locates a key for messages.
    """

    def where(host: str, *path: str | int) -> tuple[str, int | None]:
        h = hosts.get(host)
        return (h.file if h else f"hosts/{host}.yaml", line_of(host, *path) if line_of else None)

    out: list[Backend] = []
    problems: list[Problem] = []
    motoko = hosts.get(fleet.motoko)
    gateway = motoko if motoko is not None and motoko.kind == "gateway" else None
    overrides = gateway.motoko.backend_overrides() if gateway else {}
    for name, host in sorted(hosts.items()):
        if host.kind != "backend":
            continue
        v = host.gpu
        over = overrides.get(name, {})
        api_base = over.get("base_url") or f"http://{host.address}:{v.published_port}/v1"
        # Always the name vLLM really serves (one source of truth). The seed's
        # <host>_model_display is checked against it by lint, never sent to the backend.
        model = f"hosted_vllm/{v.served_name}"
        for i, alias in enumerate(v.serves):
            file, line = where(name, "vars", "serves", i)
            out.append(Backend(name, alias, "vllm", model, api_base, name, v.max_model_len, file, line))
    if gateway is not None:
        m = gateway.motoko
        file, line = where(fleet.motoko, "vars", "embed_base_url")
        out.append(
            Backend(
                f"{fleet.motoko}-embed",
                "local/embed",
                "embedding",
                f"hosted_vllm/{m.embed_model}",
                m.embed_base_url,
                None,
                m.embed_max_input_tokens,
                file,
                line,
            )
        )
        for host_name, keys in overrides.items():
            if host_name not in hosts or hosts[host_name].kind != "backend":
                for what in keys:
                    file, line = where(fleet.motoko, "vars", f"{host_name}_{what}")
                    problems.append(
                        Problem(file, line, f"unknown key '{host_name}_{what}': no gpu_node host '{host_name}'")
                    )
    if not fleet.allow_loopback_backends:
        problems.extend(_loopback(fleet, hosts, overrides, where))
    out.append(
        Backend(
            "openai-strong",
            "openai/strong",
            "openai",
            f"openai/{fleet.openai_strong_model}",
            None,
            None,
            file="fleet.yaml",
        )
    )
    out.append(
        Backend(
            "openai-cheap",
            "openai/cheap",
            "openai",
            f"openai/{fleet.openai_cheap_model}",
            None,
            None,
            file="fleet.yaml",
        )
    )
    return out, problems


def _loopback(
    fleet: Fleet,
    hosts: Mapping[str, Host],
    overrides: Mapping[str, Mapping[str, str]],
    where: Callable[..., tuple[str, int | None]],
) -> list[Problem]:
    """Backend URLs the proxy would call on its own loopback, each at the key that made it."""
    found: list[tuple[str, str, tuple[str, ...], str]] = []  # (url, host file, key path, shown)
    motoko = hosts.get(fleet.motoko)
    if motoko is not None and motoko.role == "motoko":
        found.append((motoko.motoko.embed_base_url, fleet.motoko, ("vars", "embed_base_url"), ""))
    for name, host in sorted(hosts.items()):
        if host.role != "gpu_node":
            continue
        base = overrides.get(name, {}).get("base_url")
        if base:
            found.append((base, fleet.motoko, ("vars", f"{name}_base_url"), ""))
        else:
            found.append((f"http://{host.address}:{host.gpu.published_port}/v1", name, ("address",), host.address))
    problems = []
    for url, owner, path, shown in found:
        why = loopback_problem(url, shown)
        if why:
            file, line = where(owner, *path)
            problems.append(Problem(file, line, f"{'.'.join(path)}: {why}"))
    return problems


def aliases(table: list[Backend]) -> list[str]:
    names = {b.alias for b in table} | set(REQUIRED_ALIASES)
    return sorted(names)


def chain(policy: RoutingPolicy, alias: str) -> list[str]:
    return [alias, *policy.fallbacks.get(alias, [])]


def decide(
    policy: RoutingPolicy,
    table: list[Backend],
    health: Mapping[str, Health] | None = None,
    budget_exceeded: bool = False,
) -> dict[str, Decision]:
    """For each alias, the backend serving it now and why. Pure.

    A backend with no health record counts as healthy (nothing says otherwise yet). Once the
    budget is spent, an OpenAI backend serves no alias in place of another: ``openai/*`` are
    served by the first healthy entry of ``budget_fallback``'s chain. An alias none of whose
    chain can serve keeps its own backend and is marked unavailable (``available=False``).
    """
    health = health or {}
    native = {b.alias: b for b in table}

    def up(b: Backend) -> bool:
        return health.get(b.name, Health(True)).healthy

    def usable(b: Backend) -> bool:
        return up(b) and not (budget_exceeded and b.kind == "openai")

    decisions: dict[str, Decision] = {}
    for alias in aliases(table):
        if alias not in native:
            continue  # lint reports aliases nobody serves
        own = native[alias]
        if budget_exceeded and own.kind == "openai" and policy.budget_fallback in native:
            decisions[alias] = _over_budget(policy, alias, native, up, usable)
        elif up(own):
            decisions[alias] = Decision(alias, own, "primary healthy", _ordered(policy, alias, native, up, own))
        else:
            why = health[own.name].reason or "unhealthy"
            decisions[alias] = _fallback(policy, own, native, up, usable, f"{own.name} down ({why})")
    return decisions


def _over_budget(
    policy: RoutingPolicy,
    alias: str,
    native: Mapping[str, Backend],
    up: Callable[[Backend], bool],
    usable: Callable[[Backend], bool],
) -> Decision:
    """An ``openai/*`` alias once the budget is spent: what serves ``budget_fallback``."""
    via = policy.budget_fallback
    why = f"OpenAI monthly budget spent: served by {via}"
    found = _first_usable(chain(policy, via), native, usable)
    if found is not None:
        step, b = found
        detail = "" if step == via else f" ({native[via].name} down: via {step})"
        return Decision(alias, b, why + detail, _ordered(policy, via, native, up, b))
    target = native[via]
    return Decision(alias, target, f"{why}, which has no healthy backend; unavailable", (target,), available=False)


def _fallback(
    policy: RoutingPolicy,
    own: Backend,
    native: Mapping[str, Backend],
    up: Callable[[Backend], bool],
    usable: Callable[[Backend], bool],
    down: str,
) -> Decision:
    """An alias whose own backend is down: the first usable entry of its chain, or unavailable."""
    alias = own.alias
    found = _first_usable(chain(policy, alias)[1:], native, usable)
    if found is not None:
        step, candidate = found
        return Decision(alias, candidate, f"{down}: served by {step}", _ordered(policy, alias, native, up, candidate))
    return Decision(alias, own, f"{down} and no healthy fallback; kept, unavailable", (own,), available=False)


def _first_usable(
    steps: list[str], native: Mapping[str, Backend], usable: Callable[[Backend], bool]
) -> tuple[str, Backend] | None:
    """The first alias of ``steps`` whose backend can serve, with that backend."""
    for step in steps:
        b = native.get(step)
        if b is not None and usable(b):
            return step, b
    return None


def _ordered(
    policy: RoutingPolicy,
    alias: str,
    native: Mapping[str, Backend],
    up: Callable[[Backend], bool],
    first: Backend,
) -> tuple[Backend, ...]:
    """``first``, then every other healthy backend of ``alias``'s chain, in chain order, once each."""
    out = [first]
    for step in chain(policy, alias):
        b = native.get(step)
        if b is not None and up(b) and all(b.name != o.name for o in out) and _compatible(first, b):
            out.append(b)
    return tuple(out)


def _compatible(a: Backend, b: Backend) -> bool:
    """Embeddings and chat never share a model group."""
    return (a.kind == "embedding") == (b.kind == "embedding")


def local_input_limit(policy: RoutingPolicy, b: Backend) -> int:
    """The longest prompt (tokens) a local chat deployment takes: its ``max_model_len`` less
    ``answer_reserve_tokens``, never over ``max_input_tokens`` (one rule; longer prompts go to
    ``long_context_alias``). At least 1: a backend smaller than the reserve takes nothing useful,
    which ``agent validate`` says."""
    if b.max_model_len is None:
        return policy.max_input_tokens
    return max(1, min(policy.max_input_tokens, b.max_model_len - policy.answer_reserve_tokens))


def health_check_interval_s(policy: RoutingPolicy) -> int:
    """LiteLLM's ``health_check_interval`` is whole seconds (proxy_server.py ignores a float)."""
    return max(1, math.ceil(policy.health_interval_s))


def graceful_shutdown_s(policy: RoutingPolicy) -> int:
    """``GRACEFUL_SHUTDOWN_TIMEOUT`` of the proxy: a reload lets old workers finish the longest
    non-streaming generation (``timeout``) with a margin, instead of LiteLLM's 30 s default
    that cut a 50 s stream (shared/notes/litellm.md)."""
    return math.ceil(max(policy.request_timeout_s, policy.first_token_timeout_s)) + 30


def front_timeout_s(policy: RoutingPolicy) -> int:
    """The front proxy's (HAProxy) server and client timeouts, seconds: LiteLLM may stay silent
    while it waits for each model of the longest fallback chain in turn (a non-streaming answer
    sends nothing until done), so the front must wait for all of them, with a margin; a shorter
    timeout would cut a legitimate long generation that the proxy behind it still serves."""
    chain = 1 + max((len(v) for v in policy.fallbacks.values()), default=0)
    return chain * math.ceil(max(policy.request_timeout_s, policy.first_token_timeout_s)) + 30


def cooldown_policy(policy: RoutingPolicy) -> dict[str, int]:
    """Per-deployment ``allowed_fails_policy`` (LiteLLM ``model_info``; the router-level one would
    switch health-check routing off, router.py ``_async_filter_health_check_unhealthy_deployments``).

    A timeout cools the deployment at once: a hung backend otherwise costs every request the
    whole timeout. Server errors cool it after ``failure_threshold`` in a minute (they fail fast,
    and the next deployment answers in the same request meanwhile). Connection errors are never
    cooled by LiteLLM; the background health check takes a refusing backend out.
    """
    n = policy.failure_threshold - 1  # LiteLLM cools when the fails this minute exceed the number
    return {
        "TimeoutErrorAllowedFails": 0,
        "InternalServerErrorAllowedFails": n,
        "ServiceUnavailableErrorAllowedFails": n,
        "BadGatewayErrorAllowedFails": n,
        "NotFoundErrorAllowedFails": n,
    }


def _deployment(fleet: Fleet, alias: str, b: Backend, order: int) -> dict[str, Any]:
    policy = fleet.routing
    params: dict[str, Any] = {"model": b.model, "order": order}
    info: dict[str, Any] = {"id": f"{alias}@{b.name}"}
    if b.kind == "openai":
        params["api_key"] = "os.environ/OPENAI_API_KEY"
        if fleet.openai_api_base:
            params["api_base"] = fleet.openai_api_base
        info["disable_background_health_check"] = True  # a probe is a paid call
        return {"model_name": alias, "litellm_params": params, "model_info": info}
    params["api_base"] = b.api_base
    params["api_key"] = "none"
    params["timeout"] = policy.request_timeout_s
    params["stream_timeout"] = policy.first_token_timeout_s
    if b.kind == "embedding":
        info["mode"] = "embedding"
    else:
        info["max_input_tokens"] = local_input_limit(policy, b)
    info["health_check_timeout"] = policy.probe_timeout_s
    info["cooldown_time"] = policy.cooldown_s
    info["allowed_fails_policy"] = cooldown_policy(policy)
    return {"model_name": alias, "litellm_params": params, "model_info": info}


#: The model group that takes prompts too long for every local backend once the OpenAI budget
#: is spent, when ``routing.long_context_over_budget`` allows it.
OVER_BUDGET_SUFFIX = "+over-budget"


def _over_budget_group(fleet: Fleet, groups: Mapping[str, tuple[Backend, ...]]) -> list[dict[str, Any]]:
    """With ``long_context_over_budget``: the long-context model again, as a provider that
    LiteLLM's ``provider_budget_config`` (keyed ``openai``) does not filter: ``hosted_vllm/``
    speaks the same OpenAI API. Its spend is not counted against the budget: that is the opt-in."""
    policy = fleet.routing
    target = groups.get(policy.long_context_alias, ())
    if not policy.long_context_over_budget or not target or target[0].kind != "openai":
        return []
    b = target[0]
    name = policy.long_context_alias + OVER_BUDGET_SUFFIX
    params = {
        "model": "hosted_vllm/" + b.model.removeprefix("openai/"),
        "order": 1,
        "api_key": "os.environ/OPENAI_API_KEY",
        "api_base": fleet.openai_api_base or "https://api.openai.com/v1",
    }
    info = {"id": f"{name}@{b.name}", "disable_background_health_check": True}
    return [{"model_name": name, "litellm_params": params, "model_info": info}]


def litellm_config(
    fleet: Fleet, decisions: Mapping[str, Decision], extra_router: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The LiteLLM proxy config for the given decisions (see module docstring).

    Each alias is one model group holding its fallback chain as deployments with ``order``
    1, 2, 3...: LiteLLM serves the lowest order left after its cooldown, health and context
    filters, and on a failure tries the next order within the same request (router.py,
    order-based fallbacks).
    """
    policy = fleet.routing
    model_list = [
        _deployment(fleet, alias, b, order)
        for alias in sorted(decisions)
        for order, b in enumerate(decisions[alias].deployments, 1)
    ]
    groups = {alias: d.deployments for alias, d in decisions.items()}
    fallbacks = [
        # Rule 5: a spent budget filters the paid deployments out before the call (provider
        # budget); a group left with none falls back to the budget fallback.
        {alias: [policy.budget_fallback]}
        for alias, group in sorted(groups.items())
        if alias != policy.budget_fallback
        and policy.budget_fallback in groups
        and any(b.kind == "openai" for b in group)
        and all(b.kind != "embedding" for b in group)
    ]
    overage = _over_budget_group(fleet, groups)
    model_list.extend(overage)
    long_context = [
        {alias: [policy.long_context_alias, *(m["model_name"] for m in overage)]}
        for alias, group in sorted(groups.items())
        if group[0].kind == "vllm" and alias != policy.long_context_alias and policy.long_context_alias in groups
    ]
    router: dict[str, Any] = {
        "routing_strategy": "simple-shuffle",
        "num_retries": 0,
        "timeout": policy.request_timeout_s,
        "enable_pre_call_checks": True,
        "fallbacks": fallbacks,
        "context_window_fallbacks": long_context,
        "provider_budget_config": {"openai": {"budget_limit": fleet.openai_budget_monthly_usd, "time_period": "1mo"}},
        # Cooldowns, health state and spend live in the router's cache: with Redis they are
        # shared by the workers and survive a reload.
        "redis_host": "os.environ/REDIS_HOST",
        "redis_port": "os.environ/REDIS_PORT",
    }
    router.update(extra_router or {})
    interval = health_check_interval_s(policy)
    return {
        "model_list": model_list,
        "router_settings": router,
        "litellm_settings": {
            "drop_params": True,
            "num_retries": 0,
            "request_timeout": policy.request_timeout_s,
            # Token counts (the context rule's pre-call check, costs) use tiktoken. Otherwise
            # LiteLLM fetches a tokenizer from the Hugging Face Hub for a "llama-3" model on
            # first use, synchronously, and a failed fetch is not cached: measured offline,
            # 26 s per attempt with the worker's event loop blocked (health checks time out,
            # every deployment is cooled down, requests get 429).
            "disable_hf_tokenizer_download": True,
        },
        "general_settings": {
            # The gateway probes each local deployment itself and routes around the ones that
            # fail (a group's last deployment is never filtered out).
            "background_health_checks": True,
            "health_check_interval": interval,
            "enable_health_check_routing": True,
            "health_check_staleness_threshold": 3 * interval,
        },
    }
