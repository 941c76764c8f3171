"""``plan(stack, observed) -> actions``: the pure decision at the heart of every pass.

No I/O and no Docker: the executor carries the actions out, the CLI prints them. Each action
says why. The diff is against what the agent recorded when it last applied (the hash labels
on each container, as kopf diffs against its stored diffbase), not against every live field,
so Docker's own defaults never look like drift.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from agent.core import hashing as spechash
from agent.core import labels as L
from agent.core.observed import Observed, ObservedContainer
from agent.core.stack import ServiceSpec, StackSpec

ActionKind = Literal[
    "create_network",
    "pull",
    "create",
    "recreate",
    "start",
    "reload",
    "restart",
    "remove",
    "remove_network",
    "conflict",
    "noop",
]
MUTATING = frozenset(
    {"create_network", "pull", "create", "recreate", "start", "reload", "restart", "remove", "remove_network"}
)


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    target: str  # service, network or image
    reason: str
    changed: tuple[str, ...] = ()
    container: str | None = None  # id of the container acted on, if any
    signal: str | None = None

    def __str__(self) -> str:
        return f"{self.kind:<14} {self.target:<20} {self.reason}"

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"action": self.kind, "target": self.target, "reason": self.reason}
        if self.changed:
            out["changed"] = list(self.changed)
        if self.container:
            out["container"] = self.container
        if self.signal:
            out["signal"] = self.signal
        return out


@dataclass(frozen=True, slots=True)
class Desired:
    """A service as it should be, with the hashes the executor will label it with."""

    spec: ServiceSpec
    image_id: str | None
    spec_hash: str
    files_hash: str
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def config_hash(self) -> str:
        return spechash.config_hash(self.spec_hash, self.files_hash)


def desired_service(stack: StackSpec, name: str, image_id: str | None) -> Desired:
    spec = stack.services[name]
    mounted = stack.mounted_files(name)
    return Desired(
        spec=spec,
        image_id=image_id,
        spec_hash=spechash.spec_hash(spec, image_id),
        files_hash=spechash.files_hash(mounted),
        fields=spechash.field_hashes(spec, image_id),
        files=spechash.file_hashes(mounted),
    )


def container_labels(stack: StackSpec, want: Desired, host: str, commit: str, number: int = 1) -> dict[str, str]:
    """Every label of a container the agent creates: compose's set plus our own."""
    return {
        **want.spec.labels,
        L.PROJECT: stack.project,
        L.SERVICE: want.spec.name,
        L.NUMBER: str(number),
        L.ONEOFF: "False",
        L.CONFIG_HASH: want.config_hash,
        L.IMAGE: want.image_id or "",
        L.VERSION: "2.40.0",
        L.OWNER: L.OWNER_VALUE,
        L.HOST: host,
        L.COMMIT: commit,
        L.SPEC_HASH: want.spec_hash,
        L.FILES_HASH: want.files_hash,
        L.FIELDS: spechash.canonical_json(want.fields),
        L.FILES: spechash.canonical_json(want.files),
    }


def container_name(stack: StackSpec, service: str) -> str:
    spec = stack.services[service]
    return spec.container_name or f"{stack.project}-{service}-1"


def network_name(stack: StackSpec, network: str) -> str:
    return f"{stack.project}_{network}"


def plan(stack: StackSpec, observed: Observed, on_config_change: Mapping[str, str] | None = None) -> list[Action]:
    """Actions that take ``observed`` to ``stack``, each with its reason. Pure."""
    on_config_change = on_config_change or {}
    actions: list[Action] = []

    ours = [c for c in observed.containers if c.owned and c.project == stack.project]
    by_name = {c.name: c for c in observed.containers}

    # Networks first: containers are created on them.
    for net in sorted(stack.networks.values(), key=lambda n: n.name):
        used = any(net.name in s.networks for s in stack.services.values())
        full = network_name(stack, net.name)
        if used and not net.external and full not in observed.networks:
            actions.append(Action("create_network", full, "network does not exist"))

    # Images not present locally are pulled before anything is stopped.
    for image in sorted({s.image for s in stack.services.values()}):
        if observed.images.get(image) is None:
            actions.append(Action("pull", image, "image not present locally"))

    for wave in stack.start_order():
        for name in wave:
            actions.extend(_service_actions(stack, name, observed, ours, by_name, on_config_change))

    # Orphans: our containers for services that left the desired state.
    for c in sorted(ours, key=lambda c: c.name):
        if c.service not in stack.services:
            actions.append(
                Action(
                    "remove",
                    c.service or c.name,
                    f"service '{c.service}' is no longer in the desired state",
                    container=c.id,
                )
            )
    # Networks of ours that no service uses any more (volumes are data: never removed).
    wanted = {network_name(stack, n) for s in stack.services.values() for n in s.networks}
    for owned in observed.owned_networks:
        if owned not in wanted:
            actions.append(Action("remove_network", owned, "network no longer used by the desired state"))
    return actions


def _service_actions(
    stack: StackSpec,
    name: str,
    observed: Observed,
    ours: list[ObservedContainer],
    by_name: dict[str, ObservedContainer],
    on_config_change: Mapping[str, str],
) -> list[Action]:
    want = desired_service(stack, name, observed.images.get(stack.services[name].image))
    mine = sorted(
        (c for c in ours if c.service == name), key=lambda c: (c.state != "running", c.created), reverse=False
    )
    cname = container_name(stack, name)

    # Case: someone else's container holds the name we need.
    squatter = by_name.get(cname)
    if squatter is not None and not squatter.owned:
        return [
            Action(
                "conflict",
                name,
                f"container '{cname}' exists but is not owned by llm-agent; "
                f"it is left alone and '{name}' cannot be created",
                container=squatter.id,
            )
        ]

    actions: list[Action] = []
    # Case: an interrupted pass left more than one container for the service. Keep the new
    # one only if it proved healthy; otherwise the known-good old one, and roll out again.
    if len(mine) > 1:
        proven = [
            c
            for c in mine
            if c.labels.get(L.SPEC_HASH) == want.spec_hash and c.state == "running" and c.health in (None, "healthy")
        ]
        known_good = [c for c in mine if c.labels.get(L.SPEC_HASH) != want.spec_hash]
        keep = (proven or known_good or mine)[0]
        for extra in mine:
            if extra is not keep:
                actions.append(
                    Action(
                        "remove",
                        name,
                        f"duplicate container {extra.name} (left by an interrupted pass)",
                        container=extra.id,
                    )
                )
        mine = [keep]

    # Case: not there at all.
    if not mine:
        return [*actions, Action("create", name, "no container for this service")]
    current = mine[0]

    # Case: right spec, but left under a temporary name by an interrupted replacement.
    if current.labels.get(L.SPEC_HASH) == want.spec_hash and current.name != cname:
        return [
            *actions,
            Action(
                "recreate",
                name,
                f"container has the temporary name {current.name} (interrupted pass)",
                container=current.id,
            ),
        ]

    # Case: the spec or the image changed: only a new container applies it.
    if current.labels.get(L.SPEC_HASH) != want.spec_hash:
        changed = _changed(current.json_label(L.FIELDS), want.fields)
        if want.image_id is None:
            reason = f"image {want.spec.image} not present locally (pull, then recreate)"
        elif changed == ("image_id",):
            reason = (
                f"image id changed behind '{want.spec.image}': {_short(current.image_id)} -> {_short(want.image_id)}"
            )
        elif changed:
            reason = "changed: " + ", ".join(changed)
        else:
            reason = "spec hash differs (container was changed outside the agent)"
        return [*actions, Action("recreate", name, reason, changed, container=current.id)]

    # Case: only mounted file contents changed: the role's declared action.
    if current.labels.get(L.FILES_HASH) != want.files_hash:
        files = _changed(current.json_label(L.FILES), want.files) or ("mounted files",)
        what = ", ".join(files)
        policy = on_config_change.get(name, "restart")
        if current.state != "running":
            return [
                *actions,
                Action(
                    "restart",
                    name,
                    f"{what} changed; container is {current.state}, starting it with the new files",
                    files,
                    current.id,
                ),
            ]
        if policy.startswith("signal:"):
            sig = policy.removeprefix("signal:")
            return [
                *actions,
                Action("reload", name, f"{what} changed; role policy: reload with {sig}", files, current.id, sig),
            ]
        kind: ActionKind = "recreate" if policy == "recreate" else "restart"
        return [*actions, Action(kind, name, f"{what} changed; role policy: {policy}", files, current.id)]

    # Case: right spec, but not running.
    if current.state != "running":
        return [*actions, Action("start", name, f"container is {current.state}", container=current.id)]

    return [
        *actions,
        Action("noop", name, "up to date" + (f" ({current.health})" if current.health else ""), container=current.id),
    ]


def _changed(old: Mapping[str, str], new: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)))


def _short(image_id: str | None) -> str:
    return (image_id or "none").removeprefix("sha256:")[:12]


def pending(actions: list[Action]) -> bool:
    return any(a.kind in MUTATING or a.kind == "conflict" for a in actions)
