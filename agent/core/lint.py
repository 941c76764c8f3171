"""Checks of what LiteLLM and Docker would silently accept, over the whole fleet.

Pure: takes the loaded desired state and rendered stacks, returns ``Problem``s (errors and
warnings). Each check is one function, registered in a list (``FLEET_CHECKS``,
``STACK_CHECKS``, ``PROXY_CONFIG_CHECKS``); ``lint_fleet`` and ``lint_stack`` run them all.
What the gateway *is* comes from its role (``kind: gateway``, ``proxy_config``), never from a
role's name. ``agent validate`` (load, render every host, lint) is ``agent.desired.validate``.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from agent.core.errors import DesiredStateError, Problem
from agent.core.fleet import DesiredState
from agent.core.model import REQUIRED_ALIASES, Host, RoutingPolicy
from agent.core.rendered import RenderedStack
from agent.core.routing import Backend, backends, local_input_limit
from agent.core.stack import StackFile, parse_env_file
from agent.core.yamlsrc import Document, load

COMPROMISED_LITELLM = ("1.107.0",)


# --------------------------------------------------------------------------- fleet checks


@dataclass
class FleetLint:
    """What every fleet check reads: the desired state and the backends it declares."""

    desired: DesiredState
    table: list[Backend] = field(default_factory=list)
    table_problems: list[Problem] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.table, self.table_problems = backends(self.desired.fleet, self.desired.hosts, self.line_of)

    @property
    def fdoc(self) -> Document:
        return self.desired.fleet_doc

    def served(self) -> dict[str, list[Backend]]:
        out: dict[str, list[Backend]] = defaultdict(list)
        for b in self.table:
            out[b.alias].append(b)
        return out

    def line_of(self, host: str, *path: str | int) -> int | None:
        doc = self.desired.docs.get(host)
        if doc is None:
            return None
        if path[:1] == ("vars",) and len(path) > 1 and path[1] not in ((doc.data or {}).get("vars") or {}):
            return doc.line_of("role")  # came from the role's defaults: point at the role line
        return doc.line_of(*path)


FleetCheck = Callable[[FleetLint], Iterable[Problem]]
FLEET_CHECKS: list[FleetCheck] = []


def fleet_check(check: FleetCheck) -> FleetCheck:
    FLEET_CHECKS.append(check)
    return check


def lint_fleet(desired: DesiredState) -> list[Problem]:
    ctx = FleetLint(desired)
    return [problem for check in FLEET_CHECKS for problem in check(ctx)]


@fleet_check
def backend_overrides(ctx: FleetLint) -> Iterable[Problem]:
    """``<host>_base_url`` and friends on the gateway name a backend host."""
    return ctx.table_problems


@fleet_check
def one_gateway(ctx: FleetLint) -> Iterator[Problem]:
    fleet, hosts, fdoc = ctx.desired.fleet, ctx.desired.hosts, ctx.fdoc
    if fleet.motoko not in hosts:
        yield Problem("fleet.yaml", fdoc.line_of("motoko"), f"motoko: no host file hosts/{fleet.motoko}.yaml")
    elif hosts[fleet.motoko].kind != "gateway":
        role = hosts[fleet.motoko].role
        yield Problem(
            "fleet.yaml", fdoc.line_of("motoko"), f"motoko: host '{fleet.motoko}' has role '{role}', not a gateway role"
        )
    for extra in hosts.values():
        if extra.kind == "gateway" and extra.name != fleet.motoko:
            yield Problem(
                extra.file,
                ctx.line_of(extra.name, "role"),
                f"second gateway host '{extra.name}' (fleet.yaml names '{fleet.motoko}')",
            )


@fleet_check
def aliases_served_once(ctx: FleetLint) -> Iterator[Problem]:
    for alias, bs in sorted(ctx.served().items()):
        names = " and ".join(b.name for b in bs)
        for b in bs[1:]:
            yield Problem(b.file, b.line, f"alias '{alias}' is served by two backends: {names}")


@fleet_check
def required_aliases(ctx: FleetLint) -> Iterator[Problem]:
    served = ctx.served()
    for alias in REQUIRED_ALIASES:
        if alias not in served:
            yield Problem(
                "fleet.yaml",
                _first_mention(ctx.fdoc, alias),
                f"alias '{alias}' is served by no host (add it to a gpu_node host's 'serves')",
            )


@fleet_check
def policy_aliases_exist(ctx: FleetLint) -> Iterator[Problem]:
    """Every alias the routing policy names is served by some backend."""
    known, pol, fdoc = set(ctx.served()), ctx.desired.fleet.routing, ctx.fdoc
    for alias, chain in pol.fallbacks.items():
        if alias not in known:
            yield Problem(
                "fleet.yaml",
                fdoc.line_of("routing", "fallbacks", alias),
                f"fallbacks: '{alias}' is not an alias any backend serves",
            )
        for i, target in enumerate(chain):
            if target not in known:
                yield Problem(
                    "fleet.yaml",
                    fdoc.line_of("routing", "fallbacks", alias, i),
                    f"fallback from '{alias}' to unknown alias '{target}'",
                )
    for key in ("chat_default", "embeddings_default", "long_context_alias", "budget_fallback"):
        alias = getattr(pol, key)
        if alias not in known:
            yield Problem("fleet.yaml", fdoc.line_of("routing", key), f"routing.{key}: unknown alias '{alias}'")


@fleet_check
def served_names_agree(ctx: FleetLint) -> Iterator[Problem]:
    """The gateway's seed-style ``<host>_model_hf_id`` / ``_model_display`` agree with the host."""
    gateway = ctx.desired.gateway()
    if gateway is None:
        return
    for host_name, keys in gateway.motoko.backend_overrides().items():
        backend = ctx.desired.hosts.get(host_name)
        if backend is not None and backend.kind == "backend":
            yield from _override_agrees(ctx, gateway, backend, keys)


def _override_agrees(ctx: FleetLint, gateway: Host, backend: Host, keys: dict[str, str]) -> Iterator[Problem]:
    name, served_name = backend.name, backend.gpu.served_name
    if "model_hf_id" in keys and keys["model_hf_id"] != backend.gpu.model_hf_id:
        yield Problem(
            gateway.file,
            ctx.line_of(gateway.name, "vars", f"{name}_model_hf_id"),
            f"{name}_model_hf_id is '{keys['model_hf_id']}' but {name} runs "
            f"'{backend.gpu.model_hf_id}' (hosts/{name}.yaml)",
        )
    if "model_display" not in keys:
        return
    line = ctx.line_of(gateway.name, "vars", f"{name}_model_display")
    provider, _, model = keys["model_display"].partition("/")
    # The seed writes "openai/gemma-2-9b-it-awq" for "google/gemma-2-9b-it-AWQ".
    if model.rsplit("/", 1)[-1].lower() != served_name.rsplit("/", 1)[-1].lower():
        yield Problem(
            gateway.file,
            line,
            f"{name}_model_display names model '{model}' but {name} serves '{served_name}' "
            "(the gateway always calls the served name)",
            "warning",
        )
    if provider == "openai":
        yield Problem(
            gateway.file,
            line,
            f"{name}_model_display uses the 'openai/' provider: its traffic counts against "
            "the OpenAI budget; use hosted_vllm/",
            "warning",
        )


@fleet_check
def litellm_release(ctx: FleetLint) -> Iterator[Problem]:
    gateway = ctx.desired.gateway()
    if gateway is not None and any(bad in gateway.motoko.image for bad in COMPROMISED_LITELLM):
        yield Problem(
            gateway.file,
            ctx.line_of(gateway.name, "vars", "litellm_version"),
            f"LiteLLM {gateway.motoko.image}: 1.107.0 was a compromised release; never use it",
        )


@fleet_check
def context_window(ctx: FleetLint) -> Iterator[Problem]:
    """The one context rule, explained per local alias (``routing.local_input_limit``): what
    ``agent validate`` prints instead of a contradiction to resolve by hand."""
    pol = ctx.desired.fleet.routing
    for b in ctx.table:
        if b.kind != "vllm":
            continue
        file = ctx.desired.hosts[b.host].file if b.host else b.file
        line = ctx.line_of(b.host, "vars", "max_model_len") if b.host else None
        if b.max_model_len is not None and b.max_model_len <= pol.answer_reserve_tokens:
            yield Problem(
                file,
                line,
                f"max_model_len {b.max_model_len} of {b.name} leaves no room for a prompt after "
                f"routing.answer_reserve_tokens {pol.answer_reserve_tokens}: every prompt to '{b.alias}' "
                f"goes to {pol.long_context_alias}",
                "warning",
            )
            continue
        yield Problem(file, line, _limit_note(pol, b), "info")


def _limit_note(pol: RoutingPolicy, b: Backend) -> str:
    limit = local_input_limit(pol, b)
    if b.max_model_len is None or limit == pol.max_input_tokens:
        why = f"routing.max_input_tokens {pol.max_input_tokens}"
    else:
        why = f"max_model_len {b.max_model_len} less routing.answer_reserve_tokens {pol.answer_reserve_tokens}"
    spent = (
        "over the budget (routing.long_context_over_budget)"
        if pol.long_context_over_budget
        else "a 429 naming both rules"
    )
    return (
        f"'{b.alias}' on {b.name} takes prompts up to {limit} tokens ({why}); longer prompts go to "
        f"{pol.long_context_alias} without reaching {b.name}; once the OpenAI budget is spent they get {spent}"
    )


def _first_mention(doc: Document, alias: str) -> int | None:
    """The first line of fleet.yaml's routing that names ``alias`` (where the need comes from)."""
    routing = (doc.data or {}).get("routing") or {}
    lines = []
    for key, value in routing.items():
        if value == alias:
            lines.append(doc.line_of("routing", key))
    for src, chain in (routing.get("fallbacks") or {}).items():
        if src == alias:
            lines.append(doc.line_of("routing", "fallbacks", src))
        for i, target in enumerate(chain or []):
            if target == alias:
                lines.append(doc.line_of("routing", "fallbacks", src, i))
    found = [line for line in lines if line]
    return min(found) if found else doc.line_of("routing")


# --------------------------------------------------------------------------- stack checks

StackCheck = Callable[[Host, RenderedStack, DesiredState], Iterable[Problem]]
STACK_CHECKS: list[StackCheck] = []


def stack_check(check: StackCheck) -> StackCheck:
    STACK_CHECKS.append(check)
    return check


def lint_stack(desired: DesiredState, rendered: RenderedStack) -> list[Problem]:
    """Checks of one host's rendered stack: ports, images, the proxy config."""
    host = desired.host(rendered.host)
    return [problem for check in STACK_CHECKS for problem in check(host, rendered, desired)]


@stack_check
def images_pinned(host: Host, rendered: RenderedStack, desired: DesiredState) -> Iterator[Problem]:
    for svc in rendered.stack.services.values():
        tag = svc.image.rsplit("/", 1)[-1]
        if "@sha256:" not in svc.image and (":" not in tag or svc.image.endswith(":latest")):
            yield Problem(
                host.file,
                None,
                f"service '{svc.name}': image '{svc.image}' is not pinned (use a version tag or @sha256 digest)",
                "warning",
            )


@stack_check
def ports_published_once(host: Host, rendered: RenderedStack, desired: DesiredState) -> Iterator[Problem]:
    ports: Counter[tuple[str, int, str]] = Counter()
    for svc in rendered.stack.services.values():
        for p in svc.ports:
            ports[(p.host_ip or "0.0.0.0", p.host_port, p.protocol)] += 1
    by_port: dict[tuple[int, str], list[str]] = defaultdict(list)
    for (ip, port, proto), n in ports.items():
        by_port[(port, proto)].extend([ip] * n)
    for (port, proto), ips in by_port.items():
        if len(ips) > 1 and ("0.0.0.0" in ips or len(set(ips)) < len(ips)):
            yield Problem(host.file, None, f"port {port}/{proto} is published twice on host '{host.name}'")


@stack_check
def proxy_config(host: Host, rendered: RenderedStack, desired: DesiredState) -> Iterable[Problem]:
    """The gateway role's proxy config, as the role declares it (``proxy_config``)."""
    path = desired.roles[host.role].spec.proxy_config
    config = rendered.stack.files.get(path) if path else None
    if config is None:
        return []
    # The env files: the other secret files (the config itself is one: it holds the master key).
    env = [f for f in rendered.stack.files.values() if f.secret and f.path != path]
    return lint_litellm_config(config.content, f"{rendered.host}:{path} (rendered)", _env_text(env))


@stack_check
def custom_auth_shipped(host: Host, rendered: RenderedStack, desired: DesiredState) -> Iterator[Problem]:
    """LiteLLM imports ``general_settings.custom_auth`` (``module.function``) from the config's
    directory; a module the stack does not write there would stop the proxy at its start."""
    path = desired.roles[host.role].spec.proxy_config
    config = rendered.stack.files.get(path) if path else None
    if config is None or path is None:
        return
    try:
        data = load(config.content, path).data
    except DesiredStateError:
        return  # said by proxy_config
    general = data.get("general_settings") if isinstance(data, dict) else None
    ref = general.get("custom_auth") if isinstance(general, dict) else None
    if not isinstance(ref, str) or "." not in ref:
        return
    module = str(PurePosixPath(path).parent / (ref.rsplit(".", 1)[0].replace(".", "/") + ".py"))
    if module.removeprefix("./") not in rendered.stack.files:
        yield Problem(
            host.file,
            None,
            f"general_settings.custom_auth '{ref}': the role writes no {module} next to {path} "
            "(list it in role.yaml files); the proxy would refuse to start",
        )


def _env_text(files: list[StackFile]) -> str:
    return "\n".join(f.content for f in files)


# --------------------------------------------------------------------------- the LiteLLM config


@dataclass(frozen=True)
class ProxyConfig:
    doc: Document
    name: str
    text: str
    env_keys: frozenset[str]

    @property
    def data(self) -> dict[str, Any]:
        return self.doc.data if isinstance(self.doc.data, dict) else {}

    @property
    def router(self) -> dict[str, Any]:
        return self.data.get("router_settings") or {}


ProxyCheck = Callable[[ProxyConfig], Iterable[Problem]]
PROXY_CONFIG_CHECKS: list[ProxyCheck] = []


def proxy_check(check: ProxyCheck) -> ProxyCheck:
    PROXY_CONFIG_CHECKS.append(check)
    return check


def lint_litellm_config(text: str, name: str, env_text: str) -> list[Problem]:
    """What ``litellm --validate_config`` lets through (shared/notes/litellm.md)."""
    try:
        doc = load(text, name)
    except DesiredStateError as exc:
        return exc.problems
    cfg = ProxyConfig(doc, name, text, frozenset(_env_keys(env_text)))
    return [problem for check in PROXY_CONFIG_CHECKS for problem in check(cfg)]


def _env_keys(env_text: str) -> set[str]:
    try:
        return set(parse_env_file(env_text))
    except ValueError:
        return set()


@proxy_check
def no_allowed_fails(cfg: ProxyConfig) -> Iterator[Problem]:
    for section in ("router_settings", "litellm_settings", "general_settings"):
        if "allowed_fails" in (cfg.data.get(section) or {}):
            yield Problem(
                cfg.name,
                cfg.doc.line_of(section, "allowed_fails"),
                "allowed_fails must not be set: it put a healthy fallback in cooldown during an outage "
                "(62 of 300 requests failed)",
            )


@proxy_check
def no_router_allowed_fails_policy(cfg: ProxyConfig) -> Iterator[Problem]:
    """The cooldown policy belongs on each deployment (``model_info``): a router-level one
    switches LiteLLM's health-check routing off (router.py, health-check filter)."""
    if "allowed_fails_policy" in cfg.router:
        yield Problem(
            cfg.name,
            cfg.doc.line_of("router_settings", "allowed_fails_policy"),
            "router_settings.allowed_fails_policy switches health-check routing off: a failed backend "
            "stays in routing; the generated config sets the policy per deployment",
        )


@proxy_check
def fallback_targets_exist(cfg: ProxyConfig) -> Iterator[Problem]:
    names = {m.get("model_name") for m in cfg.data.get("model_list", []) if isinstance(m, dict)}
    for key in ("fallbacks", "context_window_fallbacks"):
        for i, entry in enumerate(cfg.router.get(key, []) or []):
            for src, targets in (entry or {}).items():
                for target in [src, *targets]:
                    if target not in names:
                        yield Problem(
                            cfg.name,
                            cfg.doc.line_of("router_settings", key, i),
                            f"{key}: '{target}' is not a model_name in model_list",
                        )


@proxy_check
def no_retries(cfg: ProxyConfig) -> Iterator[Problem]:
    if cfg.router.get("num_retries", 0) != 0:
        yield Problem(
            cfg.name,
            cfg.doc.line_of("router_settings", "num_retries"),
            "num_retries > 0 delays every fallback by seconds",
            "warning",
        )


@proxy_check
def master_key_set(cfg: ProxyConfig) -> Iterator[Problem]:
    """LiteLLM 1.108.7 refuses to start without a master key (``general_settings.master_key``,
    or ``LITELLM_MASTER_KEY`` in its environment)."""
    general = cfg.data.get("general_settings") or {}
    key = general.get("master_key") if isinstance(general, dict) else None
    if (key is None or key == "") and "LITELLM_MASTER_KEY" not in cfg.env_keys:
        yield Problem(
            cfg.name,
            cfg.doc.line_of("general_settings") if "general_settings" in cfg.data else None,
            "no master key: set general_settings.master_key (the role's template: "
            "litellm_config | with_master_key(litellm_bearer_token)); the proxy would refuse to start",
        )


@proxy_check
def environ_refs_set(cfg: ProxyConfig) -> Iterator[Problem]:
    for ref in sorted(set(re.findall(r"os\.environ/([A-Za-z_][A-Za-z0-9_]*)", cfg.text))):
        if ref not in cfg.env_keys:
            yield Problem(
                cfg.name,
                None,
                f"os.environ/{ref} is referenced but not set in the env file: "
                "the proxy would not start or would send no key",
            )


@stack_check
def drained_services_exist(host: Host, rendered: RenderedStack, desired: DesiredState) -> Iterator[Problem]:
    """``role.yaml`` ``drain``: a service the stack does not have would never be drained."""
    role = desired.roles[rendered.role]
    for name in role.spec.drain:
        if name not in rendered.stack.services:
            yield Problem(
                f"roles/{rendered.role}/role.yaml",
                None,
                f"drain: service '{name}' is not in the role's stack ({', '.join(sorted(rendered.stack.services))})",
            )
