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
