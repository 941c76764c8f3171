"""Routing: which backend serves each alias, and the LiteLLM config that says so.

Pure functions of the desired state, the routing policy and the fleet's health (until the
fleet reports health, every backend counts as healthy):

- ``backends(desired)``: every backend the fleet declares, with the alias it natively serves;
- ``decide(policy, backends, health, budget_exceeded)``: for each alias, the backend serving
  it now and why (the first healthy entry of its fallback chain);
- ``litellm_config(desired, decisions)``: the proxy's config, built to the measured facts in
  ``shared/notes/litellm.md`` (``hosted_vllm/`` for local models, no ``allowed_fails``,
  ``num_retries: 0``, per-deployment timeouts, budget via ``provider_budget_config`` backed
  by Redis, no background health checks on paid models, master key from the environment).

A change of routing is a change of the rendered config, which the gateway role reloads in
place (SIGHUP), never restarting the proxy. The config holds which backend serves each alias,
never *why*: reasons go to status and logs, so a reworded reason is not a reload.
"""

from __future__ import annotations

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
    backend: Backend
    reason: str

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

    A backend with no health record counts as healthy (nothing says otherwise yet).
    """
    health = health or {}
    native = {b.alias: b for b in table}

    def up(b: Backend) -> bool:
        return health.get(b.name, Health(True)).healthy

    decisions: dict[str, Decision] = {}
    for alias in aliases(table):
        if alias not in native:
            continue  # lint reports aliases nobody serves
        own = native[alias]
        if budget_exceeded and own.kind == "openai":
            target = native.get(policy.budget_fallback)
            if target is not None:
                decisions[alias] = Decision(
                    alias, target, f"OpenAI monthly budget spent: served by {policy.budget_fallback}"
                )
                continue
        if up(own):
            decisions[alias] = Decision(alias, own, "primary healthy")
            continue
        why = health[own.name].reason or "unhealthy"
        for step in chain(policy, alias)[1:]:
            candidate = native.get(step)
            if candidate is not None and up(candidate):
                decisions[alias] = Decision(alias, candidate, f"{own.name} down ({why}): served by {step}")
                break
        else:
            decisions[alias] = Decision(alias, own, f"{own.name} down ({why}) and no healthy fallback; kept")
    return decisions


def litellm_config(
    fleet: Fleet, decisions: Mapping[str, Decision], extra_router: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The LiteLLM proxy config for the given decisions (see module docstring)."""
    policy = fleet.routing
    model_list: list[dict[str, Any]] = []
    for alias in sorted(decisions):
        b = decisions[alias].backend
        params: dict[str, Any] = {"model": b.model}
        info: dict[str, Any] = {"id": f"{alias}@{b.name}"}
        if b.kind == "openai":
            params["api_key"] = "os.environ/OPENAI_API_KEY"
            if fleet.openai_api_base:
                params["api_base"] = fleet.openai_api_base
            info["disable_background_health_check"] = True
        else:
            params["api_base"] = b.api_base
            params["api_key"] = "none"
            params["timeout"] = policy.backend_timeout_s
            params["stream_timeout"] = policy.backend_timeout_s
            if b.kind == "embedding":
                info["mode"] = "embedding"
            else:
                info["max_input_tokens"] = policy.max_input_tokens
        model_list.append({"model_name": alias, "litellm_params": params, "model_info": info})

    fallbacks = [{alias: list(rest)} for alias, rest in sorted(policy.fallbacks.items())]
    for alias, d in sorted(decisions.items()):
        # Rule 5: spent budget moves openai/* to the budget fallback; LiteLLM's provider
        # budget refuses the call and the router falls back within the same request.
        if d.backend.kind == "openai" and alias not in policy.fallbacks and alias != policy.budget_fallback:
            fallbacks.append({alias: [policy.budget_fallback]})
    long_context = [
        {alias: [policy.long_context_alias]}
        for alias, d in sorted(decisions.items())
        if d.backend.kind == "vllm" and alias != policy.long_context_alias
    ]
    router: dict[str, Any] = {
        "routing_strategy": "simple-shuffle",
        "num_retries": 0,
        "timeout": policy.backend_timeout_s,
        "enable_pre_call_checks": True,
        "fallbacks": fallbacks,
        "context_window_fallbacks": long_context,
        "provider_budget_config": {"openai": {"budget_limit": fleet.openai_budget_monthly_usd, "time_period": "1mo"}},
        "redis_host": "os.environ/REDIS_HOST",
        "redis_port": "os.environ/REDIS_PORT",
    }
    router.update(extra_router or {})
    return {
        "model_list": model_list,
        "router_settings": router,
        "litellm_settings": {"drop_params": True, "num_retries": 0, "request_timeout": policy.backend_timeout_s},
        "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
    }
