"""Roles as data: what ``role.yaml`` declares, and a loaded role.

A role folder holds ``role.yaml``, ``defaults.yaml`` and Jinja2 templates. ``role.yaml``
declares the compose template, the extra files the stack mounts (config, env), per service
what to do when a mounted file changes, and what the role *is* to the fleet (``kind``: the
gateway, or a model backend), so no code ever tests a role's name. Loading is
``agent.desired.roles``'s job; these are the types.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from agent.core.model import RoleKind, Strict
from agent.core.yamlsrc import Document


class RoleFile(Strict):
    """One extra file of the stack, rendered from a template, written under the stack dir."""

    template: str
    path: str
    mode: str = Field("0644", pattern=r"^0[0-7]{3}$")
    #: True for the files secret values may appear in (the env file; the gateway's proxy
    #: config, which holds the master key); their mode must keep group and others out.
    secret: bool = False

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        parts = Path(value).parts
        if Path(value).is_absolute() or ".." in parts:
            raise ValueError(f"file path '{value}' must stay inside the stack directory")
        return value

    @model_validator(mode="after")
    def _private(self) -> RoleFile:
        if self.secret and int(self.mode, 8) & 0o077:
            raise ValueError(f"file '{self.path}' holds secrets (secret: true): its mode must be 0600, not {self.mode}")
        return self


class RoleSpec(Strict):
    description: str = ""
    #: What the fleet treats hosts of this role as: ``gateway`` (the proxy, routing, the
    #: fleet API) or ``backend`` (serves model aliases). Decides the variables' schema too.
    kind: RoleKind
    #: gateway: the stack file holding the proxy's config (linted, reloaded in place)
    proxy_config: str | None = None
    compose: str = "compose.yaml.j2"
    files: list[RoleFile] = Field(default_factory=list)
    #: service -> action when one of its mounted files changes: ``signal:SIGHUP`` (reload in
    #: place), ``restart`` or ``recreate``. Services not listed are restarted.
    on_config_change: dict[str, str] = Field(default_factory=dict)
    #: service -> how many times a new container that misses its health deadline (without
    #: exiting) is restarted before the rollout counts as failed. For servers known to hang
    #: now and then on a cold start.
    start_retries: dict[str, Annotated[int, Field(ge=0, le=5)]] = Field(default_factory=dict)
    #: Services that serve requests through the gateway: before one is stopped or replaced,
    #: its host asks motoko to drain it (``fleet.yaml`` ``drain.*``).
    drain: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _proxy_config(self) -> RoleSpec:
        if self.proxy_config is not None and self.proxy_config not in {f.path for f in self.files}:
            raise ValueError(f"proxy_config '{self.proxy_config}' is not the path of one of the role's files")
        if self.kind == "gateway" and self.proxy_config is None:
            raise ValueError("a gateway role names its proxy_config file")
        return self

    @field_validator("on_config_change")
    @classmethod
    def _actions(cls, value: dict[str, str]) -> dict[str, str]:
        for service, action in value.items():
            if action not in ("restart", "recreate") and not action.startswith("signal:SIG"):
                raise ValueError(f"on_config_change.{service}: '{action}' is not restart, recreate or signal:SIGxxx")
        return value


class Role:
    """A loaded role: its spec, its defaults and where its templates are."""

    def __init__(
        self, name: str, root: Path, spec: RoleSpec, defaults: dict[str, Any], defaults_doc: Document, shown: str
    ):
        self.name = name
        self.shown = shown  # how messages name the role folder
        self.root = root
        self.spec = spec
        self.defaults = defaults
        self.defaults_doc = defaults_doc

    @property
    def templates(self) -> Path:
        return self.root / "templates"
