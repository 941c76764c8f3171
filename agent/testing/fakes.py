"""Public fakes of the ports in ``agent.core.ports``, type-checked against them.

``FakeEngine`` keeps containers, networks and images in dicts and answers ``observe`` from
them, so the executor, the reconcile pass and the daemon run end to end with no Docker;
``FakeClock`` makes every wait instant; ``FakeSource`` serves commits from directories.
Each records what was asked of it, for tests to assert on.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.core import labels as L
from agent.core.errors import AgentError, EngineError, EngineUnavailable, ImageUnavailable, NotFound
from agent.core.observed import Observed, ObservedContainer
from agent.core.ports import Checkout, EngineEvent
from agent.core.stack import ServiceSpec, StackSpec

#: What a started container becomes: "healthy", "unhealthy", "starting" (never ready) or "exit".
Behaviour = Callable[["FakeContainer"], str]


@dataclass
class FakeContainer:
    id: str
    name: str
    image: str
    labels: dict[str, str]
    has_healthcheck: bool = False
    state: str = "created"
    health: str | None = None
    exit_code: int = 0
    logs: str = ""
    created: int = 0
    started: int = 0

    def observed(self, image_id: str | None) -> ObservedContainer:
        return ObservedContainer(
            id=self.id,
            name=self.name,
            state=self.state,
            health=self.health,
            image_id=image_id,
            labels=dict(self.labels),
            created=f"{self.created:08d}",
        )


class FakeEventStream:
    """An event stream fed by ``FakeEngine.emit``; ``break_`` makes the iteration raise."""

    def __init__(self, project: str) -> None:
        self.project = project
        self.closed = False
        self._queue: queue.Queue[EngineEvent | EngineError | None] = queue.Queue()

    def __iter__(self) -> Iterator[EngineEvent]:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, EngineError):
                raise item
            yield item

    def put(self, event: EngineEvent) -> None:
        if not self.closed:
            self._queue.put(event)

    def break_(self, error: EngineError) -> None:
        self.closed = True
        self._queue.put(error)

    def close(self) -> None:
        self.closed = True
        self._queue.put(None)


class FakeEngine:
    """An in-memory engine. ``behaviour`` decides what a started container becomes;
        ``fail_next(op)`` makes the next call of that operation raise; ``unavailable`` makes
        every call raise ``EngineUnavailable``; ``on(op, hook)`` runs a hook inside an operation
        (to block a pass mid-way, say). Like the engine, it reports the watched events (kill, die,
    destroy) of what it does to our containers to every open ``events`` stream."""

    def __init__(
        self, images: dict[str, str] | None = None, behaviour: Behaviour | None = None, any_image: bool = False
    ) -> None:
        self.images: dict[str, str] = dict(images or {})  # present locally: ref -> id
        #: every image is present (with an id derived from its reference)
        self.any_image = any_image
        self.registry: dict[str, str] = {}  # pullable: ref -> id
        self.containers: dict[str, FakeContainer] = {}
        self.networks: dict[str, dict[str, str]] = {}
        self.volumes: set[str] = set()
        self.behaviour: Behaviour = behaviour or (lambda c: "healthy")
        self.unavailable = False
        self.calls: list[tuple[str, str]] = []
        self._fail: dict[str, EngineError] = {}
        self._hooks: dict[str, Callable[[str], None]] = {}
        self._n = 0
        self._lock = threading.RLock()
        self.streams: list[FakeEventStream] = []

    # ------------------------------------------------------------------ test controls

    def fail_next(self, op: str, error: EngineError | None = None) -> None:
        self._fail[op] = error or EngineError(f"{op}: boom")

    def on(self, op: str, hook: Callable[[str], None]) -> None:
        self._hooks[op] = hook

    def add(self, name: str, labels: dict[str, str], image: str = "img:1", state: str = "running") -> str:
        """A container that was already there (created by an earlier agent, or by hand)."""
        with self._lock:
            self._n += 1
            cid = f"c{self._n:04d}" + "0" * 8
            self.containers[cid] = FakeContainer(cid, name, image, dict(labels), state=state, created=self._n)
            return cid

    def emit(self, cid: str, *actions: str) -> None:
        """Report events of one container to the open streams that watch its project (only
        containers with our owner label, as the adapter's filter)."""
        with self._lock:
            c = self.containers.get(cid)
            if c is None or c.labels.get(L.OWNER) != L.OWNER_VALUE:
                return
            for stream in self.streams:
                if stream.project == c.labels.get(L.PROJECT):
                    for action in actions:
                        stream.put(EngineEvent(action, cid, c.name))

    def break_streams(self, error: EngineError | None = None) -> None:
        """Every open event stream breaks (the engine restarted, say)."""
        with self._lock:
            for stream in self.streams:
                stream.break_(error or EngineUnavailable("event stream: connection reset (fake)"))
            self.streams = []

    def by_name(self) -> dict[str, str]:
        return {c.name: c.state for c in self.containers.values()}

    def ops(self, op: str) -> list[str]:
        """Targets of every call of ``op``, in order."""
        return [target for name, target in self.calls if name == op]

    def _call(self, op: str, target: str = "") -> None:
        with self._lock:
            self.calls.append((op, target))
            if self.unavailable:
                raise EngineUnavailable(f"{op}: Docker engine not reachable (fake)")
            if op in self._fail:
                raise self._fail.pop(op)
        hook = self._hooks.get(op)
        if hook is not None:
            hook(target)

    def _get(self, cid: str, op: str) -> FakeContainer:
        try:
            return self.containers[cid]
        except KeyError:
            raise NotFound(f"{op} {cid[:12]}: no such container") from None

    # ------------------------------------------------------------------ the port

    def observe(self, project: str, images: list[str], names: Sequence[str] = ()) -> Observed:
        self._call("observe", project)
        with self._lock:
            wanted = set(names)
            containers = tuple(
                c.observed(self.images.get(c.image))
                for c in self.containers.values()
                if c.labels.get(L.PROJECT) == project or c.name in wanted
            )
            nets = sorted(n for n in self.networks if n.startswith(L.scoped(project, "")))
            owned = tuple(n for n in nets if self.networks[n].get(L.OWNER) == L.OWNER_VALUE)
            return Observed(
                containers=containers,
                networks=tuple(nets),
                owned_networks=owned,
                images={ref: self._image(ref) for ref in images},
            )

    def pull(self, ref: str) -> str:
        self._call("pull", ref)
        if ref not in self.registry:
            raise ImageUnavailable(f"image {ref} cannot be pulled: not found in the registry (fake)")
        self.images[ref] = self.registry[ref]
        return self.images[ref]

    def image_id(self, ref: str) -> str | None:
        self._call("image_id", ref)
        return self._image(ref)

    def _image(self, ref: str) -> str | None:
        if ref not in self.images and self.any_image:
            self.images[ref] = "sha256:" + hashlib.sha256(ref.encode()).hexdigest()
        return self.images.get(ref)

    def ensure_network(self, name: str, project: str, network: str, driver: str) -> None:
        self._call("ensure_network", name)
        self.networks.setdefault(name, {L.PROJECT: project, L.NETWORK: network, L.OWNER: L.OWNER_VALUE})

    def ensure_volume(self, name: str, project: str, volume: str, driver: str) -> None:
        self._call("ensure_volume", name)
        self.volumes.add(name)

    def remove_network(self, name: str) -> None:
        self._call("remove_network", name)
        self.networks.pop(name, None)

    def create(self, stack: StackSpec, spec: ServiceSpec, name: str, labels: dict[str, str], stack_dir: str) -> str:
        self._call("create", name)
        with self._lock:
            if any(c.name == name for c in self.containers.values()):
                raise EngineError(f"create container {name}: Conflict. The container name is already in use")
            cid = self.add(name, labels, spec.image, state="created")
            self.containers[cid].has_healthcheck = spec.healthcheck is not None
            return cid

    def start(self, cid: str) -> None:
        self._call("start", cid)
        c = self._get(cid, "start")
        c.started += 1
        what = self.behaviour(c)
        if what == "exit":
            c.state, c.exit_code, c.health = "exited", 1, None
            return
        c.state = "running"
        c.health = what if c.has_healthcheck else None

    def stop(self, cid: str, timeout: int | None = None) -> None:
        self._call("stop", cid)
        c = self._get(cid, "stop")
        if c.state == "running":
            self.emit(cid, "kill", "die")
        c.state, c.health = "exited", None

    def restart(self, cid: str, timeout: int = 10) -> None:
        self._call("restart", cid)
        if self._get(cid, "restart").state == "running":
            self.emit(cid, "kill", "die")
        self.start(cid)

    def signal(self, cid: str, sig: str) -> None:
        self._call("signal", cid)
        self._get(cid, "signal")
        self.emit(cid, "kill")

    def rename(self, cid: str, name: str) -> None:
        self._call("rename", cid)
        with self._lock:
            if any(c.name == name and c.id != cid for c in self.containers.values()):
                raise EngineError(f"rename {cid[:12]} to {name}: Conflict. The name is already in use")
            self._get(cid, "rename").name = name

    def remove(self, cid: str, grace_s: int | None = None, graceful: bool = False) -> None:
        self._call("remove", cid)
        with self._lock:
            c = self.containers.get(cid)
            if c is not None:
                self.emit(cid, *(("kill", "die") if c.state == "running" else ()), "destroy")
            self.containers.pop(cid, None)

    def state(self, cid: str) -> tuple[str, str | None, int]:
        self._call("state", cid)
        c = self._get(cid, "inspect")
        return c.state, c.health, c.exit_code

    def probe_passed_since(self, cid: str, since: float) -> bool:
        self._call("probe_passed_since", cid)
        return self._get(cid, "inspect").health == "healthy"

    def logs_tail(self, cid: str, lines: int = 5) -> str:
        c = self.containers.get(cid)
        return "\n".join(c.logs.splitlines()[-lines:]) if c else ""

    def events(self, project: str) -> FakeEventStream:
        self._call("events", project)
        stream = FakeEventStream(project)
        with self._lock:
            self.streams.append(stream)
        return stream

    def close(self) -> None:
        self.calls.append(("close", ""))


class FakeClock:
    """Time that passes only when someone sleeps: waits are instant and deterministic."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start
        self.slept = 0.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)
        self.slept += max(seconds, 0.0)


@dataclass
class FakeSource:
    """A desired-state source serving commits from directories: ``push`` makes a commit the
    branch head; ``unreachable`` makes ``current`` behave as a remote that cannot be fetched."""

    description: str = "fake://desired-state"
    commits: dict[str, Path] = field(default_factory=dict)
    head: str | None = None
    unreachable: str | None = None

    def push(self, commit: str, path: Path) -> None:
        self.commits[commit] = path
        self.head = commit

    def current(self, last_good: str | None) -> Checkout:
        if self.unreachable is not None or self.head is None:
            why = self.unreachable or "no commit pushed"
            if last_good is None or last_good not in self.commits:
                raise AgentError(f"cannot fetch {self.description}: {why}")
            return Checkout(last_good, self.commits[last_good], why)
        return Checkout(self.head, self.commits[self.head])

    def snapshot_of(self, commit: str) -> Path | None:
        return self.commits.get(commit)
