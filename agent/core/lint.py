"""Checks of what LiteLLM and Docker would silently accept, over the whole fleet.

Pure: takes the loaded desired state and rendered stacks, returns ``Problem``s (errors and
warnings). ``validate_all`` is what ``agent validate`` runs: load, render every host (secrets
redacted, references checked), then lint.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from agent.adapters.secrets import SecretResolver
from agent.core.errors import DesiredStateError, Problem
from agent.core.model import REQUIRED_ALIASES
from agent.core.routing import Backend, backends
from agent.core.yamlsrc import Document, load
from agent.desired.load import DesiredState, load_desired
from agent.desired.render import RenderedStack, render_host

COMPROMISED_LITELLM = ("1.107.0",)


def validate_all(repo: Path, secrets: SecretResolver, prefix: str = "") -> tuple[DesiredState | None, list[Problem]]:
    """Every problem of the desired state at ``repo``; the state itself if it loaded."""
    try:
        desired = load_desired(repo)
    except DesiredStateError as exc:
        return None, exc.problems
    problems = lint_fleet(desired)
    for name in sorted(desired.hosts):
        try:
            rendered = render_host(desired, name, secrets, prefix=prefix)
        except DesiredStateError as exc:
            problems.extend(exc.problems)
            continue
        problems.extend(lint_stack(desired, rendered))
    return desired, problems


def lint_fleet(desired: DesiredState) -> list[Problem]:
    fleet, hosts = desired.fleet, desired.hosts
    fdoc = desired.fleet_doc
    problems: list[Problem] = []

    def line_of(host: str, *path: str | int) -> int | None:
        doc = desired.docs.get(host)
        line = doc.line_of(*path) if doc else None
        if (
            doc is not None
            and path[:1] == ("vars",)
            and len(path) > 1
            and path[1] not in (doc.data or {}).get("vars", {})
        ):
            return doc.line_of("role")  # came from the role's defaults: point at the role line
        return line

    table, override_problems = backends(fleet, hosts, line_of)
    problems.extend(override_problems)

    # The gateway host.
    motokos = [h for h in hosts.values() if h.role == "motoko"]
    if fleet.motoko not in hosts:
        problems.append(
            Problem("fleet.yaml", fdoc.line_of("motoko"), f"motoko: no host file hosts/{fleet.motoko}.yaml")
        )
    elif hosts[fleet.motoko].role != "motoko":
        problems.append(
            Problem(
                "fleet.yaml",
                fdoc.line_of("motoko"),
                f"motoko: host '{fleet.motoko}' has role '{hosts[fleet.motoko].role}', not 'motoko'",
            )
        )
    for extra in motokos:
        if extra.name != fleet.motoko:
            problems.append(
                Problem(
                    extra.file,
                    line_of(extra.name, "role"),
                    f"second gateway host '{extra.name}' (fleet.yaml names '{fleet.motoko}')",
                )
            )

    # Each alias served by exactly one backend.
    served: dict[str, list[Backend]] = defaultdict(list)
    for b in table:
        served[b.alias].append(b)
    for alias, bs in sorted(served.items()):
        if len(bs) > 1:
            names = " and ".join(b.name for b in bs)
            for b in bs[1:]:
                problems.append(Problem(b.file, b.line, f"alias '{alias}' is served by two backends: {names}"))
    known = set(served)
    for alias in REQUIRED_ALIASES:
        if alias not in served:
            problems.append(
                Problem(
                    "fleet.yaml",
                    _first_mention(fdoc, alias),
                    f"alias '{alias}' is served by no host (add it to a gpu_node host's 'serves')",
                )
            )

    # Every alias the policy names exists.
    pol = fleet.routing
    for alias, chain in pol.fallbacks.items():
        if alias not in known:
            problems.append(
                Problem(
                    "fleet.yaml",
                    fdoc.line_of("routing", "fallbacks", alias),
                    f"fallbacks: '{alias}' is not an alias any backend serves",
                )
            )
        for i, target in enumerate(chain):
            if target not in known:
                problems.append(
                    Problem(
                        "fleet.yaml",
                        fdoc.line_of("routing", "fallbacks", alias, i),
                        f"fallback from '{alias}' to unknown alias '{target}'",
                    )
                )
    for key in ("chat_default", "embeddings_default", "long_context_alias", "budget_fallback"):
        alias = getattr(pol, key)
        if alias not in known:
            problems.append(
                Problem("fleet.yaml", fdoc.line_of("routing", key), f"routing.{key}: unknown alias '{alias}'")
            )

    # Served model names: the gateway's seed-style overrides must agree with the host.
    motoko = hosts.get(fleet.motoko)
    if motoko is not None and motoko.role == "motoko":
        for host_name, keys in motoko.motoko.backend_overrides().items():
            gpu = hosts.get(host_name)
            if gpu is None or gpu.role != "gpu_node":
                continue
            served_name = gpu.gpu.served_name
            if "model_hf_id" in keys and keys["model_hf_id"] != gpu.gpu.model_hf_id:
                problems.append(
                    Problem(
                        motoko.file,
                        line_of(motoko.name, "vars", f"{host_name}_model_hf_id"),
                        f"{host_name}_model_hf_id is '{keys['model_hf_id']}' but {host_name} runs "
                        f"'{gpu.gpu.model_hf_id}' (hosts/{host_name}.yaml)",
                    )
                )
            if "model_display" in keys:
                provider, _, name = keys["model_display"].partition("/")
                # The seed writes "openai/gemma-2-9b-it-awq" for "google/gemma-2-9b-it-AWQ".
                if name.rsplit("/", 1)[-1].lower() != served_name.rsplit("/", 1)[-1].lower():
                    problems.append(
                        Problem(
                            motoko.file,
                            line_of(motoko.name, "vars", f"{host_name}_model_display"),
                            f"{host_name}_model_display names model '{name}' but {host_name} serves '{served_name}' "
                            "(the gateway always calls the served name)",
                            "warning",
                        )
                    )
                if provider == "openai":
                    problems.append(
                        Problem(
                            motoko.file,
                            line_of(motoko.name, "vars", f"{host_name}_model_display"),
                            f"{host_name}_model_display uses the 'openai/' provider: its traffic counts against "
                            "the OpenAI budget; use hosted_vllm/",
                            "warning",
                        )
                    )
        version = motoko.motoko.image
        if any(bad in version for bad in COMPROMISED_LITELLM):
            problems.append(
                Problem(
                    motoko.file,
                    line_of(motoko.name, "vars", "litellm_version"),
                    f"LiteLLM {version}: 1.107.0 was a compromised release; never use it",
                )
            )

    # Context window: a backend that gets prompts up to max_input_tokens must hold them.
    for b in table:
        if b.kind == "vllm" and b.max_model_len is not None and b.max_model_len < pol.max_input_tokens:
            problems.append(
                Problem(
                    hosts[b.host].file if b.host else b.file,
                    line_of(b.host, "vars", "max_model_len") if b.host else None,
                    f"max_model_len {b.max_model_len} of {b.name} is below routing.max_input_tokens "
                    f"{pol.max_input_tokens}: prompts between the two reach '{b.alias}' and fail there",
                    "warning",
                )
            )
    return problems


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


def lint_stack(desired: DesiredState, rendered: RenderedStack) -> list[Problem]:
    """Checks of one host's rendered stack: ports, images, the LiteLLM config."""
    host = desired.host(rendered.host)
    problems: list[Problem] = []
    ports: Counter[tuple[str, int, str]] = Counter()
    for svc in rendered.stack.services.values():
        for p in svc.ports:
            ports[(p.host_ip or "0.0.0.0", p.host_port, p.protocol)] += 1
        if "@sha256:" not in svc.image and (":" not in svc.image.rsplit("/", 1)[-1] or svc.image.endswith(":latest")):
            problems.append(
                Problem(
                    host.file,
                    None,
                    f"service '{svc.name}': image '{svc.image}' is not pinned (use a version tag or @sha256 digest)",
                    "warning",
                )
            )
    by_port: dict[tuple[int, str], list[str]] = defaultdict(list)
    for (ip, port, proto), n in ports.items():
        by_port[(port, proto)].extend([ip] * n)
    for (port, proto), ips in by_port.items():
        if len(ips) > 1 and ("0.0.0.0" in ips or len(set(ips)) < len(ips)):
            problems.append(Problem(host.file, None, f"port {port}/{proto} is published twice on host '{host.name}'"))
    for path, f in rendered.stack.files.items():
        if path.endswith((".yaml", ".yml")) and "config" in path and rendered.role == "motoko":
            env_files = [x for x in rendered.stack.files.values() if x.secret]
            problems.extend(
                lint_litellm_config(
                    f.content, f"{rendered.host}:{path} (rendered)", env_files[0].content if env_files else ""
                )
            )
    return problems


def lint_litellm_config(text: str, name: str, env_text: str) -> list[Problem]:
    """What ``litellm --validate_config`` lets through (shared/notes/litellm.md)."""
    problems: list[Problem] = []
    try:
        doc = load(text, name)
    except DesiredStateError as exc:
        return exc.problems
    cfg: dict[str, Any] = doc.data or {}
    names = {m.get("model_name") for m in cfg.get("model_list", []) if isinstance(m, dict)}
    router = cfg.get("router_settings", {}) or {}
    for section in ("router_settings", "litellm_settings", "general_settings"):
        if "allowed_fails" in (cfg.get(section) or {}):
            problems.append(
                Problem(
                    name,
                    doc.line_of(section, "allowed_fails"),
                    "allowed_fails must not be set: it put a healthy fallback in cooldown during an outage "
                    "(62 of 300 requests failed)",
                )
            )
    for key in ("fallbacks", "context_window_fallbacks"):
        for i, entry in enumerate(router.get(key, []) or []):
            for src, targets in (entry or {}).items():
                for target in [src, *targets]:
                    if target not in names:
                        problems.append(
                            Problem(
                                name,
                                doc.line_of("router_settings", key, i),
                                f"{key}: '{target}' is not a model_name in model_list",
                            )
                        )
    if router.get("num_retries", 0) != 0:
        problems.append(
            Problem(
                name,
                doc.line_of("router_settings", "num_retries"),
                "num_retries > 0 delays every fallback by seconds",
                "warning",
            )
        )
    env_keys = {
        line.partition("=")[0].strip()
        for line in env_text.splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    }
    for ref in sorted(set(re.findall(r"os\.environ/([A-Za-z_][A-Za-z0-9_]*)", text))):
        if ref not in env_keys:
            problems.append(
                Problem(
                    name,
                    None,
                    f"os.environ/{ref} is referenced but not set in the env file: "
                    "the proxy would not start or would send no key",
                )
            )
    return problems
