"""What is actually running, in our own types: the planner's input from the Docker adapter.

Filled by the Docker adapter from a container list, a network list and one inspect per
distinct image; the planner never sees a docker object.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.core import labels as L

ContainerState = Literal["created", "running", "paused", "restarting", "removing", "exited", "dead"]


class ObservedContainer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    name: str
    state: ContainerState = "running"
    #: None when the container has no healthcheck.
    health: Literal["starting", "healthy", "unhealthy"] | None = None
    image_id: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    created: str = ""

    @property
    def owned(self) -> bool:
        return self.labels.get(L.OWNER) == L.OWNER_VALUE

    @property
    def project(self) -> str | None:
        return self.labels.get(L.PROJECT)

    @property
    def service(self) -> str | None:
        return self.labels.get(L.SERVICE)

    def json_label(self, key: str) -> dict[str, str]:
        try:
            value = json.loads(self.labels.get(key, "{}"))
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


#: A stack file that exists but cannot be read: never equal to a desired file's hash.
UNREADABLE = "unreadable"


class StackDir(BaseModel):
    """The stack directory on disk as the pass found it: what the containers mount."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: where the agent writes this stack's files now (absolute or as configured)
    path: str
    #: stack file path -> hash of its mode and content on disk (``hashing.file_hashes``'
    #: form); None when it is missing, ``UNREADABLE`` when it cannot be read (or is not text)
    files: dict[str, str | None] = Field(default_factory=dict)


class Observed(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    containers: tuple[ObservedContainer, ...] = ()
    networks: tuple[str, ...] = ()
    #: the networks above that carry our owner label (only those may ever be removed)
    owned_networks: tuple[str, ...] = ()
    #: image reference -> local image id, or None when the image is not present.
    images: dict[str, str | None] = Field(default_factory=dict)
    #: the stack files on disk; None when not observed (the planner then trusts the labels)
    stack_dir: StackDir | None = None
