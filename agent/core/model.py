"""The typed desired state: ``fleet.yaml``, ``hosts/<host>.yaml`` and each role's variables.

Pure: takes parsed ``yamlsrc.Document``s, returns frozen pydantic models or raises
``DesiredStateError`` whose problems point at ``file:line``. Unknown keys are always errors:
a typo must never be silently ignored.

Variable names follow the Ansible setup this agent replaces (``litellm_version``,
``litellm_port``, ``openai_budget_monthly_usd``, ``wintermute_model_hf_id`` ...), so an
operator's muscle memory keeps working.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
    with_config,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from typing_extensions import TypedDict

from agent.core.errors import DesiredStateError, Problem
from agent.core.yamlsrc import Document

ALIAS_RE = r"^[a-z0-9][a-z0-9_.-]*/[a-z0-9][a-z0-9_.-]*$"
SECRET_NAME_RE = r"^[a-z0-9][a-z0-9_]*$"
HOST_NAME_RE = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"

#: The five aliases the proxy always lists (contract section 5).
REQUIRED_ALIASES = ("local/chat", "local/reasoner", "local/embed", "openai/strong", "openai/cheap")

#: Per-backend overrides that the seed kept on the gateway host (``armitage_base_url`` ...).
BACKEND_OVERRIDE_RE = re.compile(r"^(?P<host>[a-z0-9][a-z0-9-]*)_(?P<what>base_url|model_hf_id|model_display)$")


# --------------------------------------------------------------------------- bounded values
#
# Every model is strict: YAML 1.1 turns ``yes``/``on`` into booleans and ``1.0e+32`` into a
# float, and pydantic's lax mode would quietly make them 1 and 10**32. A number field takes
# an int (or, for floats, an int or a float), never a bool or a string; floats are finite.

DAY_S = 86_400
#: No model's context window is anywhere near this; a larger number is a typo.
MAX_TOKENS = 10_000_000
MAX_GPUS = 64

Port = Annotated[int, Field(ge=1, le=65535)]
Tokens = Annotated[int, Field(ge=1, le=MAX_TOKENS)]
#: A timeout or period in seconds: positive, at most a day.
Seconds = Annotated[float, Field(gt=0, le=DAY_S)]
#: Seconds between health checks.
IntervalS = Annotated[int, Field(ge=1, le=3600)]
#: A ulimit: -1 is unlimited.
Ulimit = Annotated[int, Field(ge=-1, le=2**63 - 1)]

#: LiteLLM 1.108.7's ``RoutingStrategyName`` (litellm/types/litellm_params.py).
RoutingStrategy = Literal[
    "simple-shuffle",
    "least-busy",
    "usage-based-routing",
    "usage-based-routing-v2",
    "latency-based-routing",
    "cost-based-routing",
    "lar1",
]

_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_DNS_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$", re.IGNORECASE)
#: What a resolver reads as an IPv4 address although ``ipaddress`` does not: ``127.1``,
#: ``2130706433``, ``0x7f.1``, ``127.000.0.1``.
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?$", re.IGNORECASE)
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


def check_host(host: str) -> None:
    """Refuse what is neither a DNS name nor a canonical IP address (ValueError)."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if _NUMERIC_HOST.match(host):
        raise ValueError(f"host '{host}' is not a canonical IP address: write IPv4 addresses as four decimal numbers")
    if not _DNS_NAME.match(host):
        raise ValueError(f"host '{host}' is not a DNS name or IP address")


def check_url(value: str, *, api_path: bool = False) -> str:
    """An ``http(s)://host[:port]/path`` URL the proxy or an agent can call (ValueError if not)."""
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"{value!r} contains whitespace or control characters")
    try:
        url = urlsplit(value)
    except ValueError as exc:  # a bad [IPv6] host
        raise ValueError(f"'{value}' is not a valid URL: {exc}") from None
    if url.scheme not in ("http", "https") or not value.lower().startswith(url.scheme + "://"):
        raise ValueError(f"'{value}' must be an http:// or https:// URL")
    if not url.hostname:
        raise ValueError(f"'{value}' has no host")
    if url.username is not None or url.password is not None:
        raise ValueError(f"'{value}' must not carry credentials (the proxy's keys come from secrets)")
    try:
        url.port  # noqa: B018  (raises for a port out of range or not a number)
    except ValueError:
        raise ValueError(f"'{value}' has an invalid port (1-65535)") from None
    if url.port == 0:
        raise ValueError(f"'{value}' has an invalid port (1-65535)")
    if url.query or url.fragment:
        raise ValueError(f"'{value}' must not have a query or fragment")
    check_host(url.hostname)
    if api_path and url.path in ("", "/"):
        raise ValueError(f"'{value}' needs the API path, typically /v1 (e.g. http://armitage:8000/v1)")
    return value


def is_loopback(host: str) -> bool:
    """True for a host that, seen from inside a container, is that container itself."""
    host = host.lower().rstrip(".")
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


def loopback_problem(url: str, what: str = "") -> str | None:
    """Why a backend URL the LiteLLM proxy calls must not be loopback; None if it is not."""
    host = urlsplit(url).hostname or ""
    if not is_loopback(host):
        return None
    return (
        f"'{what or url}' is a loopback address: the LiteLLM proxy runs in a container, where {host} is "
        "the container itself, so every request would fail over to the fallback; use the backend host's "
        "address or DNS name (a service on the gateway host: its address, or host.docker.internal with "
        "extra_hosts: host-gateway); allow_loopback_backends: true in fleet.yaml is only for a proxy "
        "on the host network (tests)"
    )


def _url(api_path: bool) -> Any:
    return BeforeValidator(lambda v: check_url(v, api_path=api_path) if isinstance(v, str) else v)


#: A URL the proxy or an agent calls: http(s), a host.
HttpUrlStr = Annotated[str, _url(api_path=False)]
#: A vLLM-style API base: http(s), a host and the API path (``/v1``).
ApiBaseStr = Annotated[str, _url(api_path=True)]


def _ipv4(value: Any) -> Any:
    if isinstance(value, str):
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            raise ValueError(f"'{value}' must be an IPv4 address to bind to, e.g. 0.0.0.0 or 100.64.0.1") from None
    return value


def _address(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        check_host(value)
    except ValueError:
        raise ValueError(f"'{value}' must be a DNS name or an IPv4 address (no scheme, port or path)") from None
    if ":" in value:  # backends are called at http://<address>:<port>/v1
        raise ValueError(f"'{value}': an IPv6 address cannot be used as a host address; give the host a DNS name")
    return value


def _gpu_count(value: Any) -> Any:
    if value == "all" or (type(value) is int and 0 <= value <= MAX_GPUS):
        return value
    raise ValueError(f"must be 'all' or a number of GPUs from 0 to {MAX_GPUS} (got {value!r})")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True, strict=True, allow_inf_nan=False)


class SecretRef(Strict):
    """A reference to a secret, never its value: ``{secret: openai_api_key}``."""

    #: The secret's name: ``secrets/<name>.age``, ``<name>:`` in the secrets file, ``AGENT_SECRET_<NAME>``.
    secret: str = Field(pattern=SECRET_NAME_RE)


# --------------------------------------------------------------------------- fleet.yaml


class RoutingPolicy(Strict):
    """The seed's routing rules, made exact (contract section 5)."""

    #: The alias chat completions default to (the model clients name); must be served.
    chat_default: str = Field("local/chat", pattern=ALIAS_RE)
    #: The alias embeddings default to; must be served.
    embeddings_default: str = Field("local/embed", pattern=ALIAS_RE)
    #: alias -> ordered fallbacks; the first healthy entry serves the alias.
    fallbacks: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "local/chat": ["local/reasoner", "openai/strong"],
            "local/reasoner": ["openai/strong"],
        }
    )
    #: Prompts over this many input tokens go to ``long_context_alias``.
    max_input_tokens: Tokens = 12000
    #: Where prompts over ``max_input_tokens`` (or too long for every local backend) go.
    long_context_alias: str = Field("openai/strong", pattern=ALIAS_RE)
    #: Consecutive failed health checks before a backend is taken out of routing.
    failure_threshold: int = Field(3, ge=1, le=100)
    #: Seconds between motoko's health probes of each backend.
    health_interval_s: float = Field(5.0, gt=0, le=3600)
    #: Old name: the default of both ``timeout_s`` and ``stream_timeout_s`` when they are unset.
    backend_timeout_s: Seconds | None = None
    #: A local backend's whole non-streaming answer, seconds (vLLM sends nothing until done,
    #: so this bounds the longest generation; default 120, or ``backend_timeout_s``).
    timeout_s: Seconds | None = None
    #: A local backend's time to first token and every gap between streamed chunks, seconds
    #: (default 30, or ``backend_timeout_s``).
    stream_timeout_s: Seconds | None = None
    #: Tokens kept free for the answer: a local deployment takes prompts up to its
    #: ``max_model_len`` less this (and never over ``max_input_tokens``).
    answer_reserve_tokens: Tokens = 1024
    #: Seconds a local deployment stays out of routing after failing (LiteLLM cooldown).
    cooldown_s: float = Field(30.0, ge=1, le=3600)
    #: Timeout of the gateway's own background probe of each local deployment, seconds. Not
    #: tighter: a probe that times out on a starved gateway (measured: 2 s at load 37 on two
    #: cores, before the request was even sent) takes a healthy backend out of routing.
    probe_timeout_s: Seconds = 5.0
    #: A prompt too long for every local backend once the OpenAI budget is spent: false (the
    #: default) refuses it with a 4xx; true sends it to ``long_context_alias`` over the budget.
    long_context_over_budget: bool = False
    #: Which alias serves ``openai/*`` once the monthly budget is spent.
    budget_fallback: str = Field("local/chat", pattern=ALIAS_RE)
    #: Seconds between the motoko agent's own probes of every local backend (health, model
    #: list, a one-token streamed canary): what takes a dead, hung or stalled backend out of
    #: routing (``failure_threshold`` failures in a row) and puts it back (2 good probes).
    watch_interval_s: float = Field(2.0, ge=0.5, le=600)
    #: Timeout of each of those probes, seconds: a hang or a stall fails within it.
    watch_timeout_s: float = Field(2.0, ge=0.2, le=600)
    #: Routing changes within this many seconds are batched into one reload (flap damping).
    damping_s: float = Field(2.0, ge=0, le=600)

    @property
    def request_timeout_s(self) -> float:
        """The whole non-streaming answer of a local backend (LiteLLM ``timeout``)."""
        return self.timeout_s or self.backend_timeout_s or 120.0

    @property
    def first_token_timeout_s(self) -> float:
        """Time to first token and between chunks of a local backend (LiteLLM ``stream_timeout``)."""
        return self.stream_timeout_s or self.backend_timeout_s or 30.0

    @field_validator("fallbacks")
    @classmethod
    def _aliases(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        pattern = re.compile(ALIAS_RE)
        for key, chain in value.items():
            for alias in (key, *chain):
                if not pattern.match(alias):
                    raise ValueError(f"'{alias}' is not an alias of the form 'group/name'")
            if key in chain:
                raise ValueError(f"'{key}' falls back to itself")
        return value


class DrainPolicy(Strict):
    """How a GPU host's backend is drained before its vLLM is stopped or replaced
    (``fleet.yaml``: ``drain.*``)."""

    #: Drain before disruption: off, a GPU host replaces its vLLM at once (the seed's way).
    enabled: bool = True
    #: Longest wait, seconds, for the backend's running and waiting requests to finish once it
    #: is out of routing; then it is replaced anyway. Default: the longest generation
    #: (``routing.timeout_s``) plus a minute, at least 300.
    deadline_s: Seconds | None = None
    #: Backends of one fallback chain that may be out at once (drained or down): 1 keeps
    #: armitage and wintermute from ever being drained together.
    max_out_per_chain: int = Field(1, ge=1, le=100)
    #: A lease not renewed for this many seconds expires (a node that died while draining
    #: does not hold the fleet); a node renews it every quarter of it while it holds it.
    lease_ttl_s: float = Field(120.0, ge=10, le=DAY_S)
    #: Longest wait, seconds, for a lease motoko does not grant (another chain member is out);
    #: then the pass fails with that reason, nothing is changed, and a later pass asks again.
    lease_wait_s: float = Field(900.0, ge=1, le=DAY_S)
    #: motoko unreachable (or refusing the host's token) this long, seconds: the node proceeds
    #: without a drain and says so (the gateway is down anyway; a GPU host must not wait forever).
    unreachable_s: float = Field(60.0, ge=1, le=DAY_S)

    def deadline(self, routing: RoutingPolicy) -> float:
        return self.deadline_s or max(300.0, routing.request_timeout_s + 60.0)


class Fleet(Strict):
    """``fleet.yaml``: what is true for the whole fleet."""

    #: Name of the host (a file in ``hosts/``) that runs the gateway.
    motoko: str = Field("motoko", pattern=HOST_NAME_RE)
    #: Where node agents report to (the fleet API on motoko); None: derived from motoko's
    #: address and ``fleet_api_port``.
    motoko_url: HttpUrlStr | None = None
    #: Seconds between a node agent's reports to motoko (and at once on a change); a report
    #: older than three intervals is stale and takes that host's backend out of routing.
    report_interval_s: float = Field(10.0, ge=1, le=3600)
    #: OpenAI model behind the ``openai/strong`` alias.
    openai_strong_model: str = "gpt-4.1-mini"
    #: OpenAI model behind the ``openai/cheap`` alias.
    openai_cheap_model: str = "gpt-4o-mini"
    #: Monthly OpenAI spend (USD) past which ``openai/*`` is served by ``routing.budget_fallback``.
    openai_budget_monthly_usd: float = Field(150, ge=0, le=1_000_000_000)
    #: OpenAI-compatible endpoint for the openai/* aliases (a corporate proxy, Azure, a test
    #: double); None: api.openai.com.
    openai_api_base: HttpUrlStr | None = None
    #: The routing rules: the ``routing.*`` keys.
    routing: RoutingPolicy = Field(default_factory=RoutingPolicy)
    #: Draining a GPU backend before its host replaces it: the ``drain.*`` keys.
    drain: DrainPolicy = Field(default_factory=DrainPolicy)
    #: Backend URLs on loopback (127.0.0.1, localhost) are refused: inside the proxy's
    #: container they are the container itself. Only for a proxy on the host's network
    #: (tests, demos running the rendered config by hand).
    allow_loopback_backends: bool = False

    @model_validator(mode="after")
    def _loopback(self) -> Fleet:
        if self.openai_api_base and not self.allow_loopback_backends:
            problem = loopback_problem(self.openai_api_base)
            if problem:
                raise _at("openai_api_base", problem, self.openai_api_base)
        return self


# --------------------------------------------------------------------------- role variables


class GpuNodeVars(Strict):
    """Variables of the ``gpu_node`` role: one vLLM server, launched as the seed launches it."""

    #: The vLLM image (pin by digest in production).
    vllm_image: str
    #: Hugging Face model id vLLM loads (``--model``).
    model_hf_id: str
    #: Name vLLM serves the model under (``--served-model-name``); default: ``model_hf_id``.
    served_model_name: str | None = None
    #: Aliases of the gateway this host serves, e.g. ``[local/chat]``.
    serves: list[str] = Field(default_factory=list)
    #: Address vLLM binds to inside its container (``--host``).
    vllm_host: str
    #: Port vLLM listens on (``--port``).
    vllm_port: Port
    #: Port published on the host (default: ``vllm_port``); lets test "hosts" share one engine.
    vllm_published_port: Port | None = None
    #: ``--quantization`` (``awq``); null: not passed.
    quantization: str | None
    #: ``--max-model-len``: the context window; bounds the prompts routed here.
    max_model_len: Tokens
    #: ``--gpu-memory-utilization``: the share of GPU memory vLLM may take.
    gpu_memory_utilization: float = Field(gt=0, le=1)
    #: GPUs to request: ``all``, or a count; 0 is a CPU-only / test host (no device request).
    gpu_count: Annotated[int | Literal["all"], BeforeValidator(_gpu_count)]
    #: More vLLM arguments, appended as given.
    extra_args: list[str] = Field(default_factory=list)
    #: Host directory mounted as the Hugging Face cache (model weights survive recreation).
    hf_cache_dir: str
    #: Seconds the healthcheck tolerates failures while the model loads.
    health_start_period_s: int = Field(ge=0, le=DAY_S)
    #: Seconds between healthchecks (also how soon a fresh container can first be healthy).
    health_interval_s: IntervalS
    #: What the container healthcheck runs in the image to call vLLM's ``/health``.
    health_probe: Literal["python", "curl", "wget"]
    #: ``shm_size`` of the container (e.g. ``16g``); null: unset (it shares the host's IPC namespace).
    shm_size: str | None = None
    #: vLLM wants unlimited memlock and a large stack; hosts that may not raise them set {}.
    ulimits: dict[str, Ulimit] = Field(default_factory=dict)
    #: Extra environment variables of the vLLM container.
    environment: dict[str, str] = Field(default_factory=dict)
    #: This host's own credential for reporting to motoko's fleet API (a secret); None: the
    #: host does not report, and motoko routes by its own probes alone.
    report_token: SecretRef | None = None

    @field_validator("serves")
    @classmethod
    def _serves(cls, value: list[str]) -> list[str]:
        for alias in value:
            if not re.match(ALIAS_RE, alias):
                raise ValueError(f"'{alias}' is not an alias of the form 'group/name'")
        return value

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model_hf_id

    @property
    def published_port(self) -> int:
        return self.vllm_published_port or self.vllm_port


@with_config(ConfigDict(extra="allow", strict=True, allow_inf_nan=False))
class RouterSettingsExtra(TypedDict, total=False):
    """``litellm_router_settings_extra``: the router settings an operator is likely to set are
    typed and bounded; any other key passes through to ``router_settings`` (lint checks the result)."""

    routing_strategy: RoutingStrategy
    num_retries: Annotated[int, Field(ge=0, le=10)]
    max_fallbacks: Annotated[int, Field(ge=0, le=20)]
    timeout: Seconds
    stream_timeout: Seconds
    cooldown_time: Annotated[float, Field(ge=0, le=DAY_S)]
    retry_after: Annotated[int, Field(ge=0, le=3600)]
    enable_pre_call_checks: bool


def _at(key: str, message: str, value: Any) -> ValidationError:
    """A ValidationError located at ``key`` (for checks that see the whole model)."""
    return ValidationError.from_exception_data("value", [_error_at(key, message, value)])


def _error_at(key: str, message: str, value: Any) -> InitErrorDetails:
    # The message is a format template: keep braces in user input literal.
    text = message.replace("{", "{{").replace("}", "}}")
    return InitErrorDetails(type=PydanticCustomError("value_error", text), loc=(key,), input=value)


def _override_error(key: str, value: Any) -> InitErrorDetails | None:
    """What is wrong with an extra key of motoko's variables (a seed-style override), if anything."""
    match = BACKEND_OVERRIDE_RE.match(key)
    if not match:
        return InitErrorDetails(type="extra_forbidden", loc=(key,), input=value)
    if not isinstance(value, str):
        return _error_at(key, f"must be a string (got {value!r})", value)
    if match["what"] == "base_url":
        try:
            check_url(value, api_path=True)
        except ValueError as exc:
            return _error_at(key, str(exc), value)
    return None


class MotokoVars(Strict):
    """Variables of the ``motoko`` role: the LiteLLM gateway, its Redis and the embeddings slot.

    Besides the declared fields, the seed's per-backend overrides are accepted:
    ``<host>_base_url`` (api_base used for that host), ``<host>_model_hf_id`` and
    ``<host>_model_display`` (checked against what that host really serves; the host file is
    the one source of truth for the model, so they cannot disagree with it unnoticed).
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    #: LiteLLM image tag (``ghcr.io/berriai/litellm:<version>``).
    litellm_version: str
    #: Full image reference; overrides ``litellm_version`` (pin by digest in production).
    litellm_image: str | None = None
    #: Port the proxy is published on (clients use ``http://<motoko>:<port>/v1``).
    litellm_port: Port
    #: Host address the proxy's port is bound to (``0.0.0.0``: every interface).
    litellm_bind: Annotated[str, BeforeValidator(_ipv4)]
    #: Gunicorn workers of the proxy.
    litellm_workers: int = Field(ge=1, le=256)
    #: Key for the ``openai/*`` aliases.
    openai_api_key: SecretRef
    #: The proxy's master key: every client sends ``Authorization: Bearer <token>``.
    litellm_bearer_token: SecretRef
    #: Redis image (cooldowns, health state and the OpenAI spend, shared by the workers).
    redis_image: str
    #: Image of the front proxy (HAProxy) that holds ``litellm_port`` and spreads requests over
    #: the LiteLLM containers, so a LiteLLM replacement starts the new one before the old goes.
    haproxy_image: str
    #: Seconds between healthchecks of the gateway's containers.
    health_interval_s: IntervalS
    #: API base of the embeddings service behind ``local/embed``.
    embed_base_url: ApiBaseStr
    #: Model the embeddings service serves.
    embed_model: str
    #: Longest input the embeddings model takes, tokens.
    embed_max_input_tokens: Tokens
    #: The fleet API (node reports, fleet view) served by the motoko agent itself.
    fleet_api_port: Port = 8300
    fleet_api_bind: Annotated[str, BeforeValidator(_ipv4)] = "0.0.0.0"
    #: Extra ``router_settings`` merged into the generated LiteLLM config (linted).
    litellm_router_settings_extra: RouterSettingsExtra = Field(default_factory=RouterSettingsExtra)

    @model_validator(mode="after")
    def _overrides(self) -> MotokoVars:
        errors = [e for key, value in (self.model_extra or {}).items() if (e := _override_error(key, value))]
        if errors:
            # Several at once, each at its own key (pydantic-core merges a ValidationError
            # raised by a validator into the outer one, locations kept).
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self

    @property
    def image(self) -> str:
        return self.litellm_image or f"ghcr.io/berriai/litellm:{self.litellm_version}"

    def backend_overrides(self) -> dict[str, dict[str, str]]:
        """``{host: {base_url|model_hf_id|model_display: value}}`` from the seed-style keys."""
        out: dict[str, dict[str, str]] = {}
        for key, value in (self.model_extra or {}).items():
            match = BACKEND_OVERRIDE_RE.match(key)
            if match:
                out.setdefault(match["host"], {})[match["what"]] = str(value)
        return out


#: What a role is to the fleet (its ``role.yaml`` says): the gateway, or a model backend.
RoleKind = Literal["gateway", "backend"]
#: The variables' schema of each kind of role.
ROLE_VARS: dict[RoleKind, type[Strict]] = {"backend": GpuNodeVars, "gateway": MotokoVars}
ROLE_NAME_RE = r"^[a-z0-9][a-z0-9_-]*$"

# --------------------------------------------------------------------------- hosts/<host>.yaml


class HostFile(Strict):
    """``hosts/<host>.yaml`` before its variables are checked against its role."""

    #: The role folder (``roles/<role>``, in this repository or shipped with the agent).
    role: str = Field(pattern=ROLE_NAME_RE)
    #: How other hosts reach this one (DNS name or IPv4 address); default: the host's name.
    address: Annotated[str, BeforeValidator(_address)] | None = None
    #: The role's variables, over its ``defaults.yaml``; checked by the role kind's schema.
    vars: dict[str, Any] = Field(default_factory=dict)


class Host(BaseModel):
    """A host with its role variables merged over the role's defaults and validated."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    role: str
    kind: RoleKind
    address: str
    vars: GpuNodeVars | MotokoVars
    file: str

    @property
    def gpu(self) -> GpuNodeVars:
        assert isinstance(self.vars, GpuNodeVars)
        return self.vars

    @property
    def motoko(self) -> MotokoVars:
        assert isinstance(self.vars, MotokoVars)
        return self.vars


# --------------------------------------------------------------------------- validation helpers


def parse(model: type[Strict], doc: Document, data: Any = None, prefix: tuple[str, ...] = ()) -> Any:
    """Validate ``data`` (default: the whole document) and map errors to ``file:line``."""
    payload = doc.data if data is None else data
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        where = ".".join(prefix) or "the file"
        raise DesiredStateError.single(
            doc.name, doc.line_of(*prefix), f"{where} must be a mapping, not {type(payload).__name__}"
        )
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise DesiredStateError(problems_from(exc, doc, prefix)) from None


def problems_from(exc: ValidationError, doc: Document, prefix: tuple[str, ...]) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = (*prefix, *loc)
        dotted = ".".join(str(p) for p in path)
        kind = err["type"]
        if kind == "extra_forbidden":
            message = f"unknown key '{loc[-1]}'" + (f" in '{'.'.join(map(str, path[:-1]))}'" if len(path) > 1 else "")
        elif kind == "missing":
            message = f"missing required key '{dotted}'"
        elif kind == "value_error":
            message = f"{dotted + ': ' if dotted else ''}{err['msg'].removeprefix('Value error, ')}"
        else:
            got = err.get("input")
            secretish = any(w in str(loc[-1] if loc else "").lower() for w in ("key", "token", "secret", "password"))
            shown = f" (got {got!r})" if not isinstance(got, dict | list) and not secretish else ""
            message = f"'{dotted}': {err['msg'].lower()}{shown}"
        problems.append(Problem(doc.name, doc.line_of(*path), message))
    return problems
