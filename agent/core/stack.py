"""Our own typed stack spec, and the strict parser from a rendered compose document into it.

Roles render a compose file (operators know the format), but only the subset below is
supported; any other key is an error, never silently dropped, so what the executor creates
is exactly what the file says. Pure: no Docker here.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.core.errors import DesiredStateError, Problem
from agent.core.model import problems_from
from agent.core.yamlsrc import Document

# --------------------------------------------------------------------------- our spec


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PortSpec(Frozen):
    host_ip: str = ""
    host_port: int
    container_port: int
    protocol: Literal["tcp", "udp"] = "tcp"


class MountSpec(Frozen):
    type: Literal["bind", "volume"]
    #: bind: host path, or a path relative to the stack directory (``./config``); volume: name.
    source: str
    target: str
    read_only: bool = False

    @property
    def stack_relative(self) -> str | None:
        """For a bind of a stack file/dir (``./config``): its path inside the stack dir."""
        if self.type == "bind" and not self.source.startswith("/"):
            return str(PurePosixPath(self.source))
        return None


class HealthcheckSpec(Frozen):
    test: tuple[str, ...]
    interval_s: float = 30.0
    timeout_s: float = 30.0
    retries: int = 3
    start_period_s: float = 0.0


class UlimitSpec(Frozen):
    soft: int
    hard: int


class GpuSpec(Frozen):
    #: -1 means all GPUs.
    count: int = -1
    device_ids: tuple[str, ...] = ()
    driver: str = "nvidia"
    capabilities: tuple[str, ...] = ("gpu",)


class ServiceSpec(Frozen):
    name: str
    image: str
    container_name: str | None = None
    command: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    environment: dict[str, str] = Field(default_factory=dict)
    ports: tuple[PortSpec, ...] = ()
    mounts: tuple[MountSpec, ...] = ()
    networks: tuple[str, ...] = ("default",)
    depends_on: tuple[str, ...] = ()
    healthcheck: HealthcheckSpec | None = None
    restart: str = "no"
    ipc: str | None = None
    shm_size: str | None = None
    ulimits: dict[str, UlimitSpec] = Field(default_factory=dict)
    gpus: GpuSpec | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    init: bool | None = None
    stop_signal: str | None = None
    stop_grace_period_s: float | None = None
    user: str | None = None
    working_dir: str | None = None
    extra_hosts: tuple[str, ...] = ()


class NetworkSpec(Frozen):
    name: str
    driver: str = "bridge"
    external: bool = False


class VolumeSpec(Frozen):
    name: str
    driver: str = "local"
    external: bool = False


class StackFile(Frozen):
    """A file written into the stack directory (config, env) before containers start."""

    path: str
    content: str
    mode: int = 0o644
    secret: bool = False


class StackSpec(Frozen):
    project: str
    services: dict[str, ServiceSpec]
    networks: dict[str, NetworkSpec] = Field(default_factory=dict)
    volumes: dict[str, VolumeSpec] = Field(default_factory=dict)
    files: dict[str, StackFile] = Field(default_factory=dict)

    def mounted_files(self, service: str) -> list[StackFile]:
        """Stack files the service sees through a bind mount of the stack directory."""
        out = []
        for mount in self.services[service].mounts:
            rel = mount.stack_relative
            if rel is None:
                continue
            for path, f in self.files.items():
                if path == rel or path.startswith(rel.rstrip("/") + "/") or rel == ".":
                    out.append(f)
        return sorted(out, key=lambda f: f.path)

    def start_order(self) -> list[list[str]]:
        """Services in dependency waves: each wave depends only on earlier waves."""
        remaining = {name: set(s.depends_on) for name, s in self.services.items()}
        waves: list[list[str]] = []
        done: set[str] = set()
        while remaining:
            wave = sorted(n for n, deps in remaining.items() if deps <= done)
            if not wave:
                raise DesiredStateError.single(
                    self.project, None, f"depends_on cycle among {', '.join(sorted(remaining))}"
                )
            waves.append(wave)
            done.update(wave)
            for n in wave:
                del remaining[n]
        return waves


# --------------------------------------------------------------------------- compose subset


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Healthcheck(_Strict):
    test: list[str] | str
    interval: str | int | None = None
    timeout: str | int | None = None
    retries: int | None = None
    start_period: str | int | None = None
    disable: bool = False


class _Device(_Strict):
    driver: str = "nvidia"
    count: int | Literal["all"] | None = None
    device_ids: list[str] | None = None
    capabilities: list[str] = Field(default_factory=lambda: ["gpu"])


class _Reservations(_Strict):
    devices: list[_Device] = Field(default_factory=list)


class _Resources(_Strict):
    reservations: _Reservations = Field(default_factory=_Reservations)


class _Deploy(_Strict):
    resources: _Resources = Field(default_factory=_Resources)


class _Ulimit(_Strict):
    soft: int
    hard: int


class _DependsOn(_Strict):
    condition: Literal["service_started", "service_healthy", "service_completed_successfully"] = "service_started"


class _Service(_Strict):
    image: str
    container_name: str | None = None
    command: list[str] | str | None = None
    entrypoint: list[str] | str | None = None
    environment: dict[str, str | int | float | bool | None] | list[str] = Field(default_factory=dict)
    env_file: list[str] | str = Field(default_factory=list)
    ports: list[str | int] = Field(default_factory=list)
    volumes: list[str] = Field(default_factory=list)
    networks: list[str] | dict[str, None] = Field(default_factory=list)
    depends_on: list[str] | dict[str, _DependsOn] = Field(default_factory=list)
    healthcheck: _Healthcheck | None = None
    restart: Literal["no", "always", "on-failure", "unless-stopped"] = "no"
    ipc: str | None = None
    shm_size: str | int | None = None
    ulimits: dict[str, int | _Ulimit] = Field(default_factory=dict)
    deploy: _Deploy | None = None
    labels: dict[str, str] | list[str] = Field(default_factory=dict)
    init: bool | None = None
    stop_signal: str | None = None
    stop_grace_period: str | int | None = None
    user: str | None = None
    working_dir: str | None = None
    extra_hosts: list[str] = Field(default_factory=list)

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError(f"'{value}' is not an image reference")
        return value


class _Network(_Strict):
    driver: str = "bridge"
    external: bool = False


class _Volume(_Strict):
    driver: str = "local"
    external: bool = False


class _Compose(_Strict):
    services: dict[str, _Service]
    networks: dict[str, _Network | None] = Field(default_factory=dict)
    volumes: dict[str, _Volume | None] = Field(default_factory=dict)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}
_SERVICE_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")


def duration(value: str | int | float | None, default: float) -> float:
    """Compose durations (``1m30s``, ``10s``, bare seconds) in seconds."""
    if value is None:
        return default
    if isinstance(value, int | float):
        return float(value)
    parts = _DURATION.findall(value.strip())
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        raise ValueError(f"'{value}' is not a duration like 30s or 1m30s")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def parse_env_file(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines as compose reads them (comments and blank lines skipped)."""
    env: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:  # the line itself is not shown: it may hold a secret
            raise ValueError(f"env file line {number} has no '='")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def parse_compose(doc: Document, project: str, files: dict[str, StackFile]) -> StackSpec:  # noqa: PLR0912 - one branch per compose key, in file order
    """Turn a rendered compose document into a ``StackSpec``; errors name the file and line."""
    data = doc.data
    if isinstance(data, dict):
        # Compose extension fields (x-*) are for YAML anchors; they carry no meaning here.
        data = {k: v for k, v in data.items() if not str(k).startswith("x-")}
        if "version" in data:  # obsolete in compose v2, accepted and ignored as compose does
            data.pop("version")
        if "name" in data:
            data.pop("name")
    try:
        raw = _Compose.model_validate(data if isinstance(data, dict) else {})
    except ValidationError as exc:
        raise DesiredStateError(problems_from(exc, doc, ())) from None

    problems: list[Problem] = []
    services: dict[str, ServiceSpec] = {}
    networks = {name: NetworkSpec(name=name, **(n.model_dump() if n else {})) for name, n in raw.networks.items()}
    networks.setdefault("default", NetworkSpec(name="default"))
    volumes = {name: VolumeSpec(name=name, **(v.model_dump() if v else {})) for name, v in raw.volumes.items()}
    for name, svc in raw.services.items():
        try:
            services[name] = _service(name, svc, files, networks, volumes)
        except ValueError as exc:
            problems.append(Problem(doc.name, doc.line_of("services", name), f"service '{name}': {exc}"))
    for name, svc in raw.services.items():
        if isinstance(svc.depends_on, dict):
            for dep, cond in svc.depends_on.items():
                if cond.condition == "service_completed_successfully":
                    problems.append(
                        Problem(
                            doc.name,
                            doc.line_of("services", name, "depends_on", dep),
                            f"service '{name}': depends_on condition service_completed_successfully is not supported",
                        )
                    )
    for kind, entries in (("networks", raw.networks), ("volumes", raw.volumes)):
        for key, entry in entries.items():
            if entry is not None and entry.external:
                problems.append(
                    Problem(doc.name, doc.line_of(kind, key), f"{kind}.{key}: external {kind} are not supported")
                )
    for name, spec in services.items():
        for dep in spec.depends_on:
            if dep not in services:
                problems.append(
                    Problem(
                        doc.name,
                        doc.line_of("services", name, "depends_on"),
                        f"service '{name}' depends on unknown service '{dep}'",
                    )
                )
    if problems:
        raise DesiredStateError(problems)
    stack = StackSpec(project=project, services=services, networks=networks, volumes=volumes, files=files)
    stack.start_order()  # raises on cycles
    return stack


def _service(  # noqa: PLR0912 - one branch per service key
    name: str,
    svc: _Service,
    files: dict[str, StackFile],
    networks: dict[str, NetworkSpec],
    volumes: dict[str, VolumeSpec],
) -> ServiceSpec:
    if not _SERVICE_NAME.match(name):
        raise ValueError("service names are letters, digits, '_', '.', '-'")
    env: dict[str, str] = {}
    for env_path in [svc.env_file] if isinstance(svc.env_file, str) else svc.env_file:
        rel = str(PurePosixPath(env_path))
        if rel not in files:
            raise ValueError(f"env_file '{env_path}' is not a file of this stack")
        env.update(parse_env_file(files[rel].content))
    if isinstance(svc.environment, list):
        for item in svc.environment:
            key, sep, value = item.partition("=")
            env[key] = value if sep else ""
    else:
        for key, v in svc.environment.items():
            env[key] = "" if v is None else (str(v).lower() if isinstance(v, bool) else str(v))

    net_names = list(svc.networks) if svc.networks else ["default"]
    for net in net_names:
        if net not in networks:
            raise ValueError(f"network '{net}' is not declared under top-level 'networks'")

    hc = None
    test_t: tuple[str, ...] = ()
    if svc.healthcheck and not svc.healthcheck.disable:
        test = svc.healthcheck.test
        test_t = ("CMD-SHELL", test) if isinstance(test, str) else tuple(test)
        if not test_t or test_t[0] not in ("CMD", "CMD-SHELL", "NONE"):
            raise ValueError("healthcheck.test must start with CMD, CMD-SHELL or NONE")
    if svc.healthcheck and not svc.healthcheck.disable and test_t[0] != "NONE":
        hc = HealthcheckSpec(
            test=test_t,
            interval_s=duration(svc.healthcheck.interval, 30.0),
            timeout_s=duration(svc.healthcheck.timeout, 30.0),
            retries=svc.healthcheck.retries if svc.healthcheck.retries is not None else 3,
            start_period_s=duration(svc.healthcheck.start_period, 0.0),
        )

    gpus = None
    devices = svc.deploy.resources.reservations.devices if svc.deploy else []
    if len(devices) > 1:
        raise ValueError("only one device reservation is supported")
    if devices:
        d = devices[0]
        count = -1 if d.count in (None, "all") else int(d.count)
        gpus = GpuSpec(
            count=count, device_ids=tuple(d.device_ids or ()), driver=d.driver, capabilities=tuple(d.capabilities)
        )

    labels = dict(svc.labels) if isinstance(svc.labels, dict) else dict(_kv(item) for item in svc.labels)
    for key in labels:
        if key.startswith(("com.docker.compose.", "io.llm-agent.")):
            raise ValueError(f"label '{key}' is reserved for the agent")

    return ServiceSpec(
        name=name,
        image=svc.image,
        container_name=svc.container_name,
        command=_argv(svc.command),
        entrypoint=_argv(svc.entrypoint),
        environment=env,
        ports=tuple(_port(p) for p in svc.ports),
        mounts=tuple(_mount(v, volumes) for v in svc.volumes),
        networks=tuple(net_names),
        depends_on=tuple(svc.depends_on),
        healthcheck=hc,
        restart=svc.restart,
        ipc=svc.ipc,
        shm_size=None if svc.shm_size is None else str(svc.shm_size),
        ulimits={
            k: UlimitSpec(soft=v, hard=v) if isinstance(v, int) else UlimitSpec(soft=v.soft, hard=v.hard)
            for k, v in svc.ulimits.items()
        },
        gpus=gpus,
        labels=labels,
        init=svc.init,
        stop_signal=svc.stop_signal,
        stop_grace_period_s=None if svc.stop_grace_period is None else duration(svc.stop_grace_period, 10.0),
        user=svc.user,
        working_dir=svc.working_dir,
        extra_hosts=tuple(svc.extra_hosts),
    )


def _kv(item: str) -> tuple[str, str]:
    key, _, value = item.partition("=")
    return key, value


def _argv(value: list[str] | str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        import shlex

        return tuple(shlex.split(value))
    return tuple(str(v) for v in value)


_PORT = re.compile(
    r"^(?:(?P<ip>\d+\.\d+\.\d+\.\d+|\[[0-9a-f:]+\]):)?(?:(?P<host>\d+):)?(?P<ctr>\d+)(?:/(?P<proto>tcp|udp))?$"
)


def _port(value: str | int) -> PortSpec:
    m = _PORT.match(str(value))
    if not m:
        raise ValueError(f"port '{value}' is not [ip:]host:container[/proto]")
    if m["host"] is None:
        raise ValueError(f"port '{value}' must name its host port (random ports are not supported)")
    host, ctr = int(m["host"]), int(m["ctr"])
    for p in (host, ctr):
        if not 1 <= p <= 65535:
            raise ValueError(f"port {p} out of range")
    return PortSpec(
        host_ip=(m["ip"] or "").strip("[]"), host_port=host, container_port=ctr, protocol=m["proto"] or "tcp"
    )


def _mount(value: str, volumes: dict[str, VolumeSpec]) -> MountSpec:
    parts = value.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"volume '{value}' is not source:target[:ro|rw]")
    source, target = parts[0], parts[1]
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise ValueError(f"volume '{value}': mode must be ro or rw")
    if not target.startswith("/"):
        raise ValueError(f"volume '{value}': target must be an absolute path")
    if source.startswith(("/", "./", "../")) or source == ".":
        if source.startswith("../"):
            raise ValueError(f"volume '{value}': a stack path cannot leave the stack directory")
        return MountSpec(
            type="bind",
            source=source if source.startswith("/") else str(PurePosixPath(source)),
            target=target,
            read_only=mode == "ro",
        )
    if source not in volumes:
        raise ValueError(f"volume '{source}' is not declared under top-level 'volumes'")
    return MountSpec(type="volume", source=source, target=target, read_only=mode == "ro")
