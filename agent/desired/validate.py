"""``agent validate``: load the desired state, render every host (secrets redacted, references
checked), then lint the fleet and every stack. Every problem is collected, none raised."""

from __future__ import annotations

from pathlib import Path

from agent.core.errors import DesiredStateError, Problem
from agent.core.fleet import DesiredState
from agent.core.lint import lint_fleet, lint_stack
from agent.core.ports import Secrets
from agent.desired.load import load_desired
from agent.desired.render import render_host


def validate_all(repo: Path, secrets: Secrets, prefix: str = "") -> tuple[DesiredState | None, list[Problem]]:
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
