"""Roles as data: a role folder holds ``role.yaml``, ``defaults.yaml`` and Jinja2 templates.

``role.yaml`` declares the compose template, the extra files the stack mounts (config, env)
and, per service, what to do when a mounted file changes (``signal:SIGHUP``, ``restart`` or
``recreate``). The variables' types live in ``agent.core.model``; their defaults live here, as data;
what a role declares is typed in ``agent.core.roles``.

Roles are looked up in the desired-state repository's own ``roles/`` first (a fleet can carry
its own), then in the roles shipped with the agent.
"""

from __future__ import annotations

import os
from pathlib import Path

from agent.core.errors import DesiredStateError
from agent.core.model import parse
from agent.core.roles import Role, RoleSpec
from agent.core.yamlsrc import load
from agent.desired import files


def _builtin_roles() -> Path:
    """The roles shipped with the agent: the repo's ``roles/`` (installed as ``agent._roles``)."""
    source_tree = Path(__file__).resolve().parents[2] / "roles"
    if source_tree.is_dir():
        return source_tree
    return Path(__file__).resolve().parents[1] / "_roles"  # installed from a wheel


BUILTIN_ROLES = _builtin_roles()


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
