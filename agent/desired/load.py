"""Loads a desired-state tree (``fleet.yaml``, ``hosts/*.yaml``) into typed models.

Pure apart from reading files below ``root`` (the git adapter hands us a snapshot directory
of one exact commit). Every problem found in every file is collected before raising, so one
``agent validate`` run shows them all.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.core.errors import DesiredStateError, Problem
from agent.core.fleet import DesiredState
from agent.core.model import HOST_NAME_RE, ROLE_VARS, Fleet, Host, HostFile, parse, problems_from
from agent.core.roles import Role
from agent.core.yamlsrc import Document, load
from agent.desired import files
from agent.desired.roles import load_role


def load_desired(root: Path) -> DesiredState:
    root = Path(root)
    if not root.is_dir():
        raise DesiredStateError.single(str(root), None, "desired-state directory not found")
    problems: list[Problem] = []

    fleet_doc = _read(root, "fleet.yaml", problems)
    fleet = Fleet()
    if fleet_doc is not None:
        try:
            fleet = parse(Fleet, fleet_doc)
        except DesiredStateError as exc:
            problems.extend(exc.problems)

    hosts: dict[str, Host] = {}
    docs: dict[str, Document] = {}
    roles: dict[str, Role] = {}
    host_dir = root / "hosts"
    files = sorted(host_dir.glob("*.yaml")) + sorted(host_dir.glob("*.yml"))
    if not files:
        problems.append(Problem("hosts/", None, "no host files (hosts/<host>.yaml)"))
    for path in files:
        rel = f"hosts/{path.name}"
        name = path.stem
        if not re.match(HOST_NAME_RE, name):
            problems.append(Problem(rel, None, f"host name '{name}' must be lowercase letters, digits and '-'"))
            continue
        if name in docs:
            problems.append(Problem(rel, None, f"host '{name}' is defined twice (.yaml and .yml)"))
            continue
        doc = _read(root, rel, problems)
        if doc is None:
            continue
        docs[name] = doc
        try:
            hosts[name] = _host(name, doc, root, roles)
        except DesiredStateError as exc:
            problems.extend(exc.problems)

    if problems:
        raise DesiredStateError(problems)
    return DesiredState(root, fleet, fleet_doc or load("{}", "fleet.yaml"), hosts, docs, roles)


def _read(root: Path, rel: str, problems: list[Problem]) -> Document | None:
    try:
        return load(files.read_text(root, rel, rel), rel)
    except DesiredStateError as exc:
        problems.extend(exc.problems)
    return None


def _host(name: str, doc: Document, root: Path, roles: dict[str, Role]) -> Host:
    header: HostFile = parse(HostFile, doc)
    if header.role not in roles:
        roles[header.role] = load_role(header.role, root)
    role = roles[header.role]
    merged: dict[str, Any] = {**role.defaults, **header.vars}
    try:
        variables = ROLE_VARS[role.spec.kind].model_validate(merged)
    except ValidationError as exc:
        problems = []
        for problem, err in zip(problems_from(exc, doc, ("vars",)), exc.errors(), strict=True):
            key = err["loc"][0] if err["loc"] else None
            if key is not None and key not in header.vars and key in role.defaults:
                # The bad value came from the role's defaults, not from this host.
                problems.append(Problem(role.defaults_doc.name, role.defaults_doc.line_of(key), problem.message))
            else:
                problems.append(problem)
        raise DesiredStateError(problems) from None
    return Host(
        name=name, role=header.role, kind=role.spec.kind, address=header.address or name, vars=variables, file=doc.name
    )


__all__ = ["DesiredState", "load_desired"]
