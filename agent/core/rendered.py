"""One host's rendered stack: what the render step hands to lint, the planner and the executor."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agent.core.routing import Decision
from agent.core.stack import StackSpec


@dataclass(frozen=True)
class RenderedStack:
    host: str
    role: str
    project: str
    compose: str
    stack: StackSpec
    decisions: Mapping[str, Decision]


def project_name(host: str, prefix: str = "") -> str:
    """Compose project of a host's stack: ``<prefix><host>`` (compose wants lowercase)."""
    return f"{prefix}{host}".lower()
