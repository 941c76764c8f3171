"""A loaded desired state: the fleet, its hosts, their roles, and where each came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agent.core.errors import DesiredStateError
from agent.core.model import Fleet, Host
from agent.core.roles import Role
from agent.core.yamlsrc import Document


@dataclass(frozen=True)
class DesiredState:
    root: Path
    fleet: Fleet
    fleet_doc: Document
    hosts: dict[str, Host]
    docs: dict[str, Document] = field(repr=False)
    roles: dict[str, Role] = field(repr=False)

    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            known = ", ".join(sorted(self.hosts)) or "none"
            raise DesiredStateError.single(
                f"hosts/{name}.yaml", None, f"no such host '{name}' (hosts: {known})"
            ) from None

    def doc(self, host: str) -> Document:
        return self.docs[host]

    def gateway(self) -> Host | None:
        """The host fleet.yaml names as the gateway, if it is one."""
        host = self.hosts.get(self.fleet.motoko)
        return host if host is not None and host.kind == "gateway" else None

    def motoko_url(self) -> str | None:
        """Where node agents report: ``fleet.yaml``'s ``motoko_url``, else the gateway's address
        and fleet API port; ``None`` without a gateway."""
        if self.fleet.motoko_url:
            return self.fleet.motoko_url
        gw = self.gateway()
        if gw is None:
            return None
        port = getattr(gw.vars, "fleet_api_port", None)
        return f"http://{gw.address}:{port}" if port else None
