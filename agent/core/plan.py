"""``plan(stack, observed) -> actions``: the pure decision at the heart of every pass.

No I/O and no Docker: the executor carries the actions out, the CLI prints them. Each action
says why. The diff is against what the agent recorded when it last applied (the hash labels
on each container, as kopf diffs against its stored diffbase), not against every live field,
so Docker's own defaults never look like drift.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.core import hashing as spechash
from agent.core import labels as L
from agent.core.observed import UNREADABLE, Observed, ObservedContainer
from agent.core.outcomes import MUTATING, ActionKind

__all__ = ["MUTATING", "Action", "ActionKind", "Desired", "plan"]
from agent.core.stack import ServiceSpec, StackSpec


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    target: str  # service, network or image
    reason: str
    changed: tuple[str, ...] = ()
    container: str | None = None  # id of the container acted on, if any
    signal: str | None = None

    def __str__(self) -> str:
        return f"{self.kind!s:<14} {self.target:<20} {self.reason}"

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"action": str(self.kind), "target": self.target, "reason": self.reason}
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
        L.VERSION: L.COMPOSE_VERSION,
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
    return L.scoped(stack.project, network)


def plan(stack: StackSpec, observed: Observed, on_config_change: Mapping[str, str] | None = None) -> list[Action]:
    """Actions that take ``observed`` to ``stack``, each with its reason. Pure."""
    view = _View(stack, observed, on_config_change or {})
    actions = [*_networks(stack, observed), *_pulls(stack, observed), *_files_on_disk(stack, observed)]
    for wave in stack.start_order():
        for name in wave:
            actions.extend(_service_actions(view, name))
    return [*actions, *_orphans(view), *_unused_networks(stack, observed)]


@dataclass(frozen=True)
class _View:
    """What the per-service rules read: the stack, what runs, and the role's reload policy."""

    stack: StackSpec
    observed: Observed
    on_config_change: Mapping[str, str]

    @property
    def ours(self) -> list[ObservedContainer]:
        return [c for c in self.observed.containers if c.owned and c.project == self.stack.project]

    def named(self, name: str) -> ObservedContainer | None:
        return next((c for c in self.observed.containers if c.name == name), None)


def _networks(stack: StackSpec, observed: Observed) -> list[Action]:
    """Networks first: containers are created on them."""
    out = []
    for net in sorted(stack.networks.values(), key=lambda n: n.name):
        used = any(net.name in s.networks for s in stack.services.values())
        full = network_name(stack, net.name)
        if used and not net.external and full not in observed.networks:
            out.append(Action(ActionKind.CREATE_NETWORK, full, "network does not exist"))
    return out


def _pulls(stack: StackSpec, observed: Observed) -> list[Action]:
    """Images not present locally are pulled before anything is stopped."""
    return [
        Action(ActionKind.PULL, image, "image not present locally")
        for image in sorted({s.image for s in stack.services.values()})
        if observed.images.get(image) is None
    ]


def _files_on_disk(stack: StackSpec, observed: Observed) -> list[Action]:
    """Stack files on disk that are not what is desired (deleted, edited, or a new state
    directory): rewritten before any service is touched. What runs must match, files included."""
    disk = observed.stack_dir
    if disk is None:
        return []
    want = spechash.file_hashes(stack.files.values())
    return [
        Action(ActionKind.WRITE_FILE, path, _disk_reason(path, disk.files.get(path)))
        for path, digest in sorted(want.items())
        if disk.files.get(path) != digest
    ]


def _disk_reason(path: str, found: str | None) -> str:
    how = {None: "missing: deleted, or a new state directory", UNREADABLE: "unreadable"}.get(found, "edited")
    return f"{path} on disk differs from the desired state ({how})"


def _orphans(view: _View) -> list[Action]:
    """Our containers for services that left the desired state."""
    return [
        Action(
            ActionKind.REMOVE,
            c.service or c.name,
            f"service '{c.service}' is no longer in the desired state",
            container=c.id,
        )
        for c in sorted(view.ours, key=lambda c: c.name)
        if c.service not in view.stack.services
    ]


def _unused_networks(stack: StackSpec, observed: Observed) -> list[Action]:
    """Networks of ours that no service uses any more (volumes are data: never removed)."""
    wanted = {network_name(stack, n) for s in stack.services.values() for n in s.networks}
    return [
        Action(ActionKind.REMOVE_NETWORK, owned, "network no longer used by the desired state")
        for owned in observed.owned_networks
        if owned not in wanted
    ]


def _service_actions(view: _View, name: str) -> list[Action]:
    """The rules for one service, in order; the first that applies decides."""
    stack = view.stack
    want = desired_service(stack, name, view.observed.images.get(stack.services[name].image))
    cname = container_name(stack, name)
    squatter = view.named(cname)
    if squatter is not None and not squatter.owned:
        return [_conflict(name, cname, squatter)]
    mine = sorted((c for c in view.ours if c.service == name), key=lambda c: (c.state != "running", c.created))
    removals, current = _dedupe(name, mine, want)
    if current is None:
        return [*removals, Action(ActionKind.CREATE, name, "no container for this service")]
    rules = (_renamed, _spec_changed, _moved, _mount_gone, _files_changed, _disk_drift, _not_running)
    for rule in rules:
        action = rule(view, name, current, want)
        if action is not None:
            return [*removals, action]
    up = "up to date" + (f" ({current.health})" if current.health else "")
    return [*removals, Action(ActionKind.NOOP, name, up, container=current.id)]


def _conflict(name: str, cname: str, squatter: ObservedContainer) -> Action:
    """Someone else's container holds the name we need."""
    return Action(
        ActionKind.CONFLICT,
        name,
        f"container '{cname}' exists but is not owned by llm-agent; it is left alone and '{name}' cannot be created",
        container=squatter.id,
    )


def _dedupe(name: str, mine: list[ObservedContainer], want: Desired) -> tuple[list[Action], ObservedContainer | None]:
    """An interrupted pass left more than one container for the service: keep the new one only
    if it proved healthy; otherwise the known-good old one (and roll out again)."""
    if len(mine) <= 1:
        return [], (mine[0] if mine else None)
    proven = [
        c
        for c in mine
        if c.labels.get(L.SPEC_HASH) == want.spec_hash and c.state == "running" and c.health in (None, "healthy")
    ]
    known_good = [c for c in mine if c.labels.get(L.SPEC_HASH) != want.spec_hash]
    keep = (proven or known_good or mine)[0]
    removals = [
        Action(
            ActionKind.REMOVE,
            name,
            f"duplicate container {extra.name} (left by an interrupted pass)",
            container=extra.id,
        )
        for extra in mine
        if extra is not keep
    ]
    return removals, keep


def _renamed(view: _View, name: str, current: ObservedContainer, want: Desired) -> Action | None:
    """Right spec, but left under a temporary name by an interrupted replacement."""
    if current.labels.get(L.SPEC_HASH) == want.spec_hash and current.name != container_name(view.stack, name):
        reason = f"container has the temporary name {current.name} (interrupted pass)"
        return Action(ActionKind.RECREATE, name, reason, container=current.id)
    return None


def _spec_changed(view: _View, name: str, current: ObservedContainer, want: Desired) -> Action | None:
    """The spec or the image changed: only a new container applies it."""
    if current.labels.get(L.SPEC_HASH) == want.spec_hash:
        return None
    changed = _changed(current.json_label(L.FIELDS), want.fields)
    if want.image_id is None:
        reason = f"image {want.spec.image} not present locally (pull, then recreate)"
    elif changed == ("image_id",):
        reason = f"image id changed behind '{want.spec.image}': {_short(current.image_id)} -> {_short(want.image_id)}"
    elif changed:
        reason = "changed: " + ", ".join(changed)
    else:
        reason = "spec hash differs (container was changed outside the agent)"
    return Action(ActionKind.RECREATE, name, reason, changed, container=current.id)


def _moved(view: _View, name: str, current: ObservedContainer, want: Desired) -> Action | None:
    """The container bind-mounts stack files from another directory than the one the agent
    writes now (the state directory moved): only a new container mounts the new one."""
    disk = view.observed.stack_dir
    if disk is None or not any(m.stack_relative is not None for m in want.spec.mounts):
        return None
    was = current.labels.get(L.WORKING_DIR)
    if not was or was == disk.path:
        return None
    reason = f"container mounts its files from {was}; the stack directory is now {disk.path}"
    return Action(ActionKind.RECREATE, name, reason, ("stack directory",), container=current.id)


def _files_changed(view: _View, name: str, current: ObservedContainer, want: Desired) -> Action | None:
    """Only mounted file contents changed: the role's declared action."""
    if current.labels.get(L.FILES_HASH) == want.files_hash:
        return None
    files = _changed(current.json_label(L.FILES), want.files) or ("mounted files",)
    what = ", ".join(files)
    if current.state != "running":
        reason = f"{what} changed; container is {current.state}, starting it with the new files"
        return Action(ActionKind.RESTART, name, reason, files, current.id)
    return _config_action(view, name, current, files, f"{what} changed")


def _mount_gone(view: _View, name: str, current: ObservedContainer, want: Desired) -> Action | None:
    """A file the service mounts is missing or unreadable on disk: its directory may have been
    replaced under the bind mount, which a reload would not see (whatever else changed). It is
    rewritten (``_files_on_disk``), then the container restarted, which mounts it afresh."""
    disk = view.observed.stack_dir
    if disk is None or current.state != "running":
        return None  # not observed; or not running: started after the files are rewritten
    gone = tuple(p for p in sorted(want.files) if disk.files.get(p) in (None, UNREADABLE))
    if not gone:
        return None
    policy = view.on_config_change.get(name, "restart")
    kind = ActionKind.RECREATE if policy == "recreate" else ActionKind.RESTART
    reason = (
        f"{', '.join(gone)} on disk differs from the desired state (deleted or unreadable); "
        "rewritten, then restarted so the container mounts it afresh"
    )
    return Action(kind, name, reason, gone, current.id)


def _disk_drift(view: _View, name: str, current: ObservedContainer, want: Desired) -> Action | None:
    """A file the service mounts was edited on disk (the labels agree, the disk does not):
    rewritten (``_files_on_disk``), then the role's action."""
    disk = view.observed.stack_dir
    if disk is None or current.state != "running":
        return None
    drifted = tuple(p for p, digest in sorted(want.files.items()) if disk.files.get(p) != digest)
    if not drifted:
        return None
    what = f"{', '.join(drifted)} on disk differs from the desired state"
    return _config_action(view, name, current, drifted, f"{what} (edited); rewritten")


def _config_action(view: _View, name: str, current: ObservedContainer, files: tuple[str, ...], what: str) -> Action:
    """The role's declared action for new mounted files on a running container."""
    policy = view.on_config_change.get(name, "restart")
    if policy.startswith("signal:"):
        sig = policy.removeprefix("signal:")
        reason = f"{what}; role policy: reload with {sig}"
        return Action(ActionKind.RELOAD, name, reason, files, current.id, sig)
    kind = ActionKind.RECREATE if policy == "recreate" else ActionKind.RESTART
    return Action(kind, name, f"{what}; role policy: {policy}", files, current.id)


def _not_running(view: _View, name: str, current: ObservedContainer, want: Desired) -> Action | None:
    """Right spec, but not running."""
    if current.state != "running":
        return Action(ActionKind.START, name, f"container is {current.state}", container=current.id)
    return None


def _changed(old: Mapping[str, str], new: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)))


def _short(image_id: str | None) -> str:
    return (image_id or "none").removeprefix("sha256:")[:12]


def pending(actions: list[Action]) -> bool:
    return any(a.kind in MUTATING or a.kind is ActionKind.CONFLICT for a in actions)
