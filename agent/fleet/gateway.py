"""What the motoko agent needs to know about its fleet, read from one desired-state commit.

``GatewayView.load(repo, host, resolver)``: the routing policy and backend table, the local
backends it probes itself, the report token of every host that reports, and where its own
proxy listens (with the master key, to check what the proxy serves after a reload). Built
after every pass that read a new commit; a rotated token or a new backend takes effect then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agent.adapters.secrets import SecretResolver
from agent.core.errors import DesiredStateError
from agent.core.fleet import DesiredState
from agent.core.model import Fleet, GpuNodeVars, MotokoVars
from agent.core.routing import Backend, backends
from agent.desired.load import load_desired


@dataclass(frozen=True)
class Target:
    """A local backend the motoko agent probes: its name in routing, API and served model."""

    name: str
    api_base: str
    served_name: str
    #: The gpu_node host behind it, when that host reports (its report counts too).
    reporting_host: str | None


@dataclass(frozen=True)
class GatewayView:
    commit: str
    fleet: Fleet
    table: list[Backend]
    targets: list[Target]
    #: host -> its report token (hosts without ``report_token`` do not report)
    tokens: dict[str, str] = field(repr=False)
    #: the fleet API's bind address and port
    api_address: tuple[str, int]
    #: the proxy on this host, as the agent reaches it, and its master key
    proxy_url: str
    master_key: str = field(repr=False)
    #: the role's proxy config file, relative to the stack dir (``role.yaml``: proxy_config)
    proxy_config: str = "config/config.yaml"
    extra_router: dict[str, object] = field(default_factory=dict)

    @classmethod
    def load(cls, repo: Path, commit: str, host: str, resolver: SecretResolver) -> GatewayView:
        desired = load_desired(repo)
        gw = desired.gateway()
        if gw is None or gw.name != host:
            raise DesiredStateError.single("fleet.yaml", None, f"host '{host}' is not the fleet's gateway")
        assert isinstance(gw.vars, MotokoVars)
        table, _ = backends(desired.fleet, desired.hosts)
        return cls(
            commit=commit,
            fleet=desired.fleet,
            table=table,
            targets=_targets(desired, table),
            tokens=_tokens(desired, resolver),
            api_address=(gw.vars.fleet_api_bind, gw.vars.fleet_api_port),
            proxy_url=f"http://127.0.0.1:{gw.vars.litellm_port}",
            master_key=resolver.value(gw.vars.litellm_bearer_token.secret),
            proxy_config=desired.roles[gw.role].spec.proxy_config or "config/config.yaml",
            extra_router=dict(gw.vars.litellm_router_settings_extra),
        )


def _targets(desired: DesiredState, table: list[Backend]) -> list[Target]:
    out: list[Target] = []
    for b in table:
        if b.kind != "vllm" or b.api_base is None:
            continue  # paid models are never probed (a probe is a paid call); embeddings: see notes
        host = desired.hosts.get(b.host or "")
        reports = host is not None and isinstance(host.vars, GpuNodeVars) and host.vars.report_token is not None
        served = b.model.removeprefix("hosted_vllm/")
        out.append(Target(b.name, b.api_base, served, b.host if reports else None))
    # One target per backend (a host serving two aliases is probed once).
    unique = {t.name: t for t in out}
    return [unique[n] for n in sorted(unique)]


def _tokens(desired: DesiredState, resolver: SecretResolver) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for name, host in sorted(desired.hosts.items()):
        if isinstance(host.vars, GpuNodeVars) and host.vars.report_token is not None:
            tokens[name] = resolver.value(host.vars.report_token.secret)
    return tokens
