"""The Docker adapter: the only module that imports ``docker``.

It implements the ``Engine`` port (``agent.core.ports``): it observes (into
``agent.core.observed`` types), performs single, named operations for the executor, and
streams the engine's events for the daemon. Every exception of the docker SDK and of
``requests`` underneath it is mapped at this boundary onto our own tree (a test pins that none escapes):

    AgentError
    └── EngineError             any engine failure, with the operation that failed
        ├── EngineUnavailable   the daemon cannot be reached
        ├── ImageUnavailable    an image is neither present nor pullable
        ├── NotFound            the container/network it named is gone
        └── NetworkInUse        a network still has endpoints (left for a later pass)

(the classes live in ``agent.core.errors``, so fakes raise the same ones).

Observation costs a container list, a network list and one image inspect per distinct image,
whatever the number of services: three calls for a single-image stack (engine API 1.41, see
shared/notes/docker.md).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

import docker
import docker.errors
import requests.exceptions
import structlog
import urllib3.exceptions
from docker.types import DeviceRequest, EndpointConfig, Healthcheck, Ulimit

from agent.core import labels as L
from agent.core.errors import EngineError, EngineUnavailable, ImageUnavailable, NetworkInUse, NotFound
from agent.core.observed import Observed, ObservedContainer
from agent.core.ports import WATCHED_EVENTS, EngineEvent
from agent.core.stack import ServiceSpec, StackSpec

__all__ = [
    "DockerEngine",
    "EngineError",
    "EngineUnavailable",
    "ImageUnavailable",
    "NetworkInUse",
    "NotFound",
    "split_ref",
]

log = structlog.get_logger("agent.engine")

NS = 1_000_000_000


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    try:
        yield
    except docker.errors.ImageNotFound as exc:
        raise ImageUnavailable(f"{what}: {_explain(exc)}") from None
    except docker.errors.NotFound as exc:
        raise NotFound(f"{what}: {_explain(exc)}") from None
    except docker.errors.APIError as exc:
        if exc.status_code == 403 and what.startswith("remove network"):
            raise NetworkInUse(f"{what}: {_explain(exc)}") from None  # engine: "has active endpoints"
        raise EngineError(f"{what}: {_explain(exc)}") from None
    except docker.errors.DockerException as exc:
        raise EngineUnavailable(f"{what}: Docker engine not reachable ({exc})") from None
    except requests.exceptions.RequestException as exc:
        raise EngineUnavailable(f"{what}: Docker engine not reachable ({type(exc).__name__})") from None


def _explain(exc: docker.errors.APIError) -> str:
    return str(exc.explanation or exc)


def split_ref(ref: str) -> tuple[str, str | None]:
    """``repo[:tag][@digest]`` -> (repository, tag or digest) as the pull API wants them."""
    if "@" in ref:
        repo, digest = ref.split("@", 1)
        return repo, digest
    name, _, tag = ref.rpartition(":")
    if name and "/" not in tag:
        return name, tag
    return ref, "latest"


class DockerEngine:
    """A thin wrapper over the low-level API client (``docker.APIClient``)."""

    def __init__(self, api: Any | None = None, base_url: str | None = None) -> None:
        if api is None:
            url = base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
            try:
                with _mapped("connect"):
                    # Let the SDK negotiate: the engine here is 20.10 (API 1.41).
                    api = docker.APIClient(base_url=url, version="auto", timeout=60)
            except EngineError:
                raise EngineUnavailable(f"Docker engine not reachable at {url} (is dockerd running?)") from None
        self.api = api

    def close(self) -> None:
        self.api.close()

    def __enter__(self) -> DockerEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ observe

    def observe(self, project: str, images: list[str], names: Sequence[str] = ()) -> Observed:
        """Our containers for ``project`` (plus any container holding one of ``names``), the
        project's networks, and the local id of each image: a container list, a network list
        and one inspect per distinct image (the engine resolves ``docker.io/library/x``,
        ``name:tag@digest`` and friends, so no reference is ever misread as missing)."""
        with _mapped("list containers"):
            raw = self.api.containers(all=True)
        wanted = set(names)
        containers = []
        for c in raw:
            labels = c.get("Labels") or {}
            cname = (c.get("Names") or ["/?"])[0].lstrip("/")
            if labels.get(L.PROJECT) == project or cname in wanted:
                containers.append(_container(c, cname))
        with _mapped("list networks"):
            # By name (the engine matches substrings; compared exactly below): a network of
            # ours that lost its labels still counts as existing.
            nets = self.api.networks(filters={"name": L.scoped(project, "")})
        ours = [
            n
            for n in nets
            if str(n["Name"]).startswith(L.scoped(project, ""))
            and (n.get("Labels") or {}).get(L.PROJECT, project) == project
        ]
        return Observed(
            containers=tuple(containers),
            networks=tuple(sorted(n["Name"] for n in ours)),
            owned_networks=tuple(
                sorted(n["Name"] for n in ours if (n.get("Labels") or {}).get(L.OWNER) == L.OWNER_VALUE)
            ),
            images={ref: self.image_id(ref) for ref in images},
        )

    # ------------------------------------------------------------------ images

    def pull(self, ref: str) -> str:
        """Pull ``ref`` with progress in the log; returns the image id."""
        repo, tag = split_ref(ref)
        last = 0.0
        with _mapped(f"pull {ref}"):
            for event in self.api.pull(repo, tag=tag, stream=True, decode=True):
                if "error" in event:
                    raise ImageUnavailable(f"image {ref} cannot be pulled: {event['error']}")
                now = time.monotonic()
                if now - last > 2:
                    log.info("pull progress", image=ref, status=event.get("status"), progress=event.get("progress"))
                    last = now
        return self.image_id(ref) or ""

    def image_id(self, ref: str) -> str | None:
        try:
            with _mapped(f"inspect image {ref}"):
                return str(self.api.inspect_image(ref)["Id"])
        except (ImageUnavailable, NotFound):
            return None

    # ------------------------------------------------------------------ networks / volumes

    def ensure_network(self, name: str, project: str, network: str, driver: str) -> None:
        with _mapped(f"create network {name}"):
            if self.api.networks(names=[name]):
                return
            self.api.create_network(
                name,
                driver=driver,
                check_duplicate=True,
                labels={L.PROJECT: project, L.NETWORK: network, L.OWNER: L.OWNER_VALUE, L.VERSION: L.COMPOSE_VERSION},
            )

    def ensure_volume(self, name: str, project: str, volume: str, driver: str) -> None:
        with _mapped(f"create volume {name}"):
            self.api.create_volume(
                name, driver=driver, labels={L.PROJECT: project, L.VOLUME: volume, L.OWNER: L.OWNER_VALUE}
            )

    def remove_network(self, name: str) -> None:
        try:
            with _mapped(f"remove network {name}"):
                self.api.remove_network(name)
        except NotFound:
            pass
        except NetworkInUse:
            log.warning("network still has endpoints; left for later", network=name)

    # ------------------------------------------------------------------ containers

    def create(self, stack: StackSpec, spec: ServiceSpec, name: str, labels: dict[str, str], stack_dir: str) -> str:
        nets = [L.scoped(stack.project, n) for n in spec.networks]
        with _mapped(f"container config for {name}"):
            return self._create(stack, spec, name, labels, stack_dir, nets)

    def _create(
        self, stack: StackSpec, spec: ServiceSpec, name: str, labels: dict[str, str], stack_dir: str, nets: list[str]
    ) -> str:
        host_config = self.api.create_host_config(
            port_bindings={
                f"{p.container_port}/{p.protocol}": (p.host_ip or "0.0.0.0", p.host_port) for p in spec.ports
            },
            binds=[_bind(m.type, m.source, m.target, m.read_only, stack, stack_dir) for m in spec.mounts] or None,
            restart_policy={"Name": spec.restart} if spec.restart != "no" else None,
            ipc_mode=spec.ipc,
            shm_size=spec.shm_size,
            ulimits=[Ulimit(name=k, soft=v.soft, hard=v.hard) for k, v in sorted(spec.ulimits.items())] or None,
            device_requests=(
                [
                    DeviceRequest(
                        driver=spec.gpus.driver,
                        count=spec.gpus.count,
                        device_ids=list(spec.gpus.device_ids),
                        capabilities=[list(spec.gpus.capabilities)],
                    )
                ]
                if spec.gpus
                else None
            ),
            init=spec.init,
            extra_hosts=list(spec.extra_hosts) or None,
            network_mode=nets[0],
        )
        hc = spec.healthcheck
        health = (
            Healthcheck(
                test=list(hc.test),
                interval=int(hc.interval_s * NS),
                timeout=int(hc.timeout_s * NS),
                retries=hc.retries,
                start_period=int(hc.start_period_s * NS),
            )
            if hc
            else None
        )
        # API 1.41: only one network in the create call; the rest are connected afterwards.
        networking = {"EndpointsConfig": {nets[0]: EndpointConfig("1.41", aliases=[spec.name])}}
        with _mapped(f"create container {name}"):
            created = self.api.create_container(
                image=spec.image,
                name=name,
                command=list(spec.command) if spec.command is not None else None,
                entrypoint=list(spec.entrypoint) if spec.entrypoint is not None else None,
                environment=dict(spec.environment),
                labels=labels,
                host_config=host_config,
                ports=[(p.container_port, p.protocol) for p in spec.ports] or None,
                networking_config=networking,
                healthcheck=health,
                user=spec.user,
                working_dir=spec.working_dir,
                stop_signal=spec.stop_signal,
                stop_timeout=int(spec.stop_grace_period_s) if spec.stop_grace_period_s is not None else None,
                hostname=None,
                detach=True,
            )
        cid = str(created["Id"])
        for net in nets[1:]:
            with _mapped(f"connect {name} to {net}"):
                self.api.connect_container_to_network(cid, net, aliases=[spec.name])
        return cid

    def start(self, cid: str) -> None:
        with _mapped(f"start {cid[:12]}"):
            self.api.start(cid)

    def stop(self, cid: str, timeout: int | None = None) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s (None: the container's own stop timeout)."""
        with _mapped(f"stop {cid[:12]}"):
            self.api.stop(cid, timeout=timeout)

    def restart(self, cid: str, timeout: int = 10) -> None:
        with _mapped(f"restart {cid[:12]}"):
            self.api.restart(cid, timeout=timeout)

    def signal(self, cid: str, sig: str) -> None:
        with _mapped(f"signal {sig} to {cid[:12]}"):
            self.api.kill(cid, signal=sig)

    def rename(self, cid: str, name: str) -> None:
        with _mapped(f"rename {cid[:12]} to {name}"):
            self.api.rename(cid, name)

    def remove(self, cid: str, grace_s: int | None = None, graceful: bool = False) -> None:
        """Remove a container. With ``grace_s`` (or ``graceful``: the container's own stop
        timeout) it is stopped first, never killed outright with its data mid-write."""
        try:
            if grace_s is not None or graceful:
                self.stop(cid, timeout=grace_s)
            with _mapped(f"remove {cid[:12]}"):
                self.api.remove_container(cid, force=True, v=False)
        except NotFound:
            pass

    def state(self, cid: str) -> tuple[str, str | None, int]:
        """(status, health or None, exit code) of one container."""
        with _mapped(f"inspect {cid[:12]}"):
            st = self.api.inspect_container(cid)["State"]
        health = (st.get("Health") or {}).get("Status")
        return str(st.get("Status")), health, int(st.get("ExitCode") or 0)

    def probe_passed_since(self, cid: str, since: float) -> bool:
        """Whether a healthcheck probe that started at or after ``since`` (epoch s) passed."""
        with _mapped(f"inspect {cid[:12]}"):
            health = self.api.inspect_container(cid)["State"].get("Health") or {}
        for entry in health.get("Log") or []:
            if entry.get("ExitCode") == 0 and _epoch(str(entry.get("Start", ""))) >= since:
                return True
        return False

    def events(self, project: str) -> DockerEvents:
        """The watched events (``WATCHED_EVENTS``) of our containers in ``project``, filtered
        by the engine. ``close()`` on the result ends the iteration from another thread."""
        filters = {
            "label": [f"{L.OWNER}={L.OWNER_VALUE}", f"{L.PROJECT}={project}"],
            "type": "container",
            "event": list(WATCHED_EVENTS),
        }
        with _mapped("watch events"):
            return DockerEvents(self.api.events(decode=True, filters=filters))

    def logs_tail(self, cid: str, lines: int = 5) -> str:
        try:
            with _mapped(f"logs {cid[:12]}"):
                return bytes(self.api.logs(cid, tail=lines)).decode("utf-8", "replace").strip()
        except EngineError:
            return ""


class DockerEvents:
    """The engine's event stream in our types. Every failure while reading it is an
    ``EngineUnavailable``; once ``close`` was called, the iteration just ends."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._closed = False

    def __iter__(self) -> Iterator[EngineEvent]:
        try:
            with _mapped("event stream"):
                for raw in self._stream:
                    event = _event(raw)
                    if event is not None:
                        yield event
        except EngineError:
            if not self._closed:
                raise
        except (urllib3.exceptions.HTTPError, OSError, ValueError, AttributeError) as exc:
            if not self._closed:  # a socket torn down under the reader
                raise EngineUnavailable(f"event stream: broken ({type(exc).__name__})") from None

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(Exception):  # already closed, or the socket already gone
            self._stream.close()


def _event(raw: Any) -> EngineEvent | None:
    if not isinstance(raw, dict) or raw.get("Type", "container") != "container":
        return None
    actor = raw.get("Actor") or {}
    action = str(raw.get("Action") or raw.get("status") or "").split(":")[0]
    cid = str(actor.get("ID") or raw.get("id") or "")
    if action not in WATCHED_EVENTS or not cid:
        return None
    name = str((actor.get("Attributes") or {}).get("name", ""))
    return EngineEvent(action, cid, name, float(raw.get("time") or 0))


def _epoch(stamp: str) -> float:
    """Docker's RFC 3339 time with nanoseconds, as epoch seconds (0 if unreadable)."""
    match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", stamp)
    if not match:
        return 0.0
    base = datetime.fromisoformat(match[1] + (match[3] if match[3] != "Z" else "+00:00"))
    return base.timestamp() + float(match[2] or 0)


def _bind(kind: str, source: str, target: str, read_only: bool, stack: StackSpec, stack_dir: str) -> str:
    """``-v`` form: a missing host directory is created, as compose does."""
    if kind == "volume":
        src = L.scoped(stack.project, source)
    elif source.startswith("/"):
        src = source
    else:
        src = str(PurePosixPath(stack_dir) / source)
    return f"{src}:{target}:{'ro' if read_only else 'rw'}"


def _container(c: dict[str, Any], name: str) -> ObservedContainer:
    status = str(c.get("Status") or "")
    health = None
    if "(healthy)" in status:
        health = "healthy"
    elif "(unhealthy)" in status:
        health = "unhealthy"
    elif "(health: starting)" in status:
        health = "starting"
    return ObservedContainer(
        id=c["Id"],
        name=name,
        state=c.get("State", "exited"),
        health=health,
        image_id=c.get("ImageID"),
        labels=c.get("Labels") or {},
        created=str(c.get("Created", "")),
    )
