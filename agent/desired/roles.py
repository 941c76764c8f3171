"""Roles as data: a role folder holds ``role.yaml``, ``defaults.yaml`` and Jinja2 templates.

``role.yaml`` declares the compose template, the extra files the stack mounts (config, env)
and, per service, what to do when a mounted file changes (``signal:SIGHUP``, ``restart`` or
``recreate``). The variables' types live in ``agent.model``; their defaults live here, as data.

Roles are looked up in the desired-state repository's own ``roles/`` first (a fleet can carry
its own), then in the roles shipped with the agent.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from agent.core.errors import DesiredStateError
from agent.core.model import Strict, parse
from agent.core.yamlsrc import Document, load
from agent.desired import files


def _builtin_roles() -> Path:
    """The roles shipped with the agent: the repo's ``roles/`` (installed as ``agent._roles``)."""
    source_tree = Path(__file__).resolve().parents[2] / "roles"
    if source_tree.is_dir():
        return source_tree
    return Path(__file__).resolve().parents[1] / "_roles"  # installed from a wheel


BUILTIN_ROLES = _builtin_roles()

ConfigChangeAction = Literal["restart", "recreate"] | str


class RoleFile(Strict):
    """One extra file of the stack, rendered from a template, written under the stack dir."""

    template: str
    path: str
    mode: str = Field("0644", pattern=r"^0[0-7]{3}$")
    #: True for the env file: the only place secret values may appear.
    secret: bool = False

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        parts = Path(value).parts
        if Path(value).is_absolute() or ".." in parts:
            raise ValueError(f"file path '{value}' must stay inside the stack directory")
        return value


class RoleSpec(Strict):
    description: str = ""
    compose: str = "compose.yaml.j2"
    files: list[RoleFile] = Field(default_factory=list)
    #: service -> action when one of its mounted files changes: ``signal:SIGHUP`` (reload in
    #: place), ``restart`` or ``recreate``. Services not listed are restarted.
    on_config_change: dict[str, str] = Field(default_factory=dict)
    #: service -> how many times a new container that misses its health deadline (without
    #: exiting) is restarted before the rollout counts as failed. For servers known to hang
    #: now and then on a cold start.
    start_retries: dict[str, Annotated[int, Field(ge=0, le=5)]] = Field(default_factory=dict)

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


def search_path(repo: Path) -> list[Path]:
    paths = [repo / "roles"]
    if env := os.environ.get("AGENT_ROLES_DIR"):
        paths.append(Path(env))
    paths.append(BUILTIN_ROLES)
    return paths


def load_role(name: str, repo: Path) -> Role:
    # The first folder named for the role is the role: a fleet's broken copy is an error,
    # never a silent fall back to the shipped one.
    for base in search_path(repo):
        root = base / name
        if os.path.lexists(root):
            break
    else:
        raise DesiredStateError.single(f"roles/{name}", None, f"role '{name}' not found")
    # The repo's own roles and the shipped ones are both "roles/<name>" to the operator.
    shown = f"roles/{name}" if base in (repo / "roles", BUILTIN_ROLES) else str(root)
    # Role files are read through files.read_text: a fleet's role stays inside the repo.
    fence, rel = (repo, f"roles/{name}") if base == repo / "roles" else (base, name)
    if not files.inside(fence, root):
        raise DesiredStateError.single(shown, None, "is a link that leads outside the desired-state tree (refused)")
    spec_doc = load(files.read_text(fence, f"{rel}/role.yaml", f"{shown}/role.yaml"), f"{shown}/role.yaml")
    spec: RoleSpec = parse(RoleSpec, spec_doc)
    has_defaults = files.exists(fence, f"{rel}/defaults.yaml")
    defaults_text = files.read_text(fence, f"{rel}/defaults.yaml", f"{shown}/defaults.yaml") if has_defaults else "{}"
    defaults_doc = load(defaults_text, f"{shown}/defaults.yaml")
    if defaults_doc.data is not None and not isinstance(defaults_doc.data, dict):
        raise DesiredStateError.single(defaults_doc.name, 1, "defaults must be a mapping")
    for f in (spec.compose, *(rf.template for rf in spec.files)):
        if not (root / "templates" / f).is_file():
            raise DesiredStateError.single(f"{shown}/role.yaml", None, f"template '{f}' not found in {shown}/templates")
    return Role(name, root, spec, dict(defaults_doc.data or {}), defaults_doc, shown)
