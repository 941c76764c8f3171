"""The typed desired state: ``fleet.yaml``, ``hosts/<host>.yaml`` and each role's variables.

Pure: takes parsed ``yamlsrc.Document``s, returns frozen pydantic models or raises
``DesiredStateError`` whose problems point at ``file:line``. Unknown keys are always errors:
a typo must never be silently ignored.

Variable names follow the Ansible setup this agent replaces (``litellm_version``,
``litellm_port``, ``openai_budget_monthly_usd``, ``wintermute_model_hf_id`` ...), so an
operator's muscle memory keeps working.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.core.errors import DesiredStateError, Problem
from agent.core.yamlsrc import Document

ALIAS_RE = r"^[a-z0-9][a-z0-9_.-]*/[a-z0-9][a-z0-9_.-]*$"
SECRET_NAME_RE = r"^[a-z0-9][a-z0-9_]*$"
HOST_NAME_RE = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"

#: The five aliases the proxy always lists (contract section 5).
REQUIRED_ALIASES = ("local/chat", "local/reasoner", "local/embed", "openai/strong", "openai/cheap")

#: Per-backend overrides that the seed kept on the gateway host (``armitage_base_url`` ...).
BACKEND_OVERRIDE_RE = re.compile(r"^(?P<host>[a-z0-9][a-z0-9-]*)_(?P<what>base_url|model_hf_id|model_display)$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class SecretRef(Strict):
    """A reference to a secret, never its value: ``{secret: openai_api_key}``."""

    secret: str = Field(pattern=SECRET_NAME_RE)


# --------------------------------------------------------------------------- fleet.yaml


class RoutingPolicy(Strict):
    """The seed's routing rules, made exact (contract section 5)."""

    chat_default: str = Field("local/chat", pattern=ALIAS_RE)
    embeddings_default: str = Field("local/embed", pattern=ALIAS_RE)
    #: alias -> ordered fallbacks; the first healthy entry serves the alias.
    fallbacks: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "local/chat": ["local/reasoner", "openai/strong"],
            "local/reasoner": ["openai/strong"],
        }
    )
    #: Prompts over this many input tokens go to ``long_context_alias``.
    max_input_tokens: int = Field(12000, gt=0)
    long_context_alias: str = Field("openai/strong", pattern=ALIAS_RE)
    #: Consecutive failed health checks before a backend is taken out of routing.
    failure_threshold: int = Field(3, ge=1)
    #: Seconds between motoko's health probes of each backend.
    health_interval_s: float = Field(5.0, gt=0)
    #: Per-request timeout for a local backend, seconds (a hung backend costs this much).
    backend_timeout_s: float = Field(30.0, gt=0)
    #: Which alias serves ``openai/*`` once the monthly budget is spent.
    budget_fallback: str = Field("local/chat", pattern=ALIAS_RE)

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


class Fleet(Strict):
    """``fleet.yaml``: what is true for the whole fleet."""

    #: Name of the host (a file in ``hosts/``) that runs the gateway.
    motoko: str = Field("motoko", pattern=HOST_NAME_RE)
    #: Where node agents report to (the fleet API on motoko); None: derived from motoko's address.
    motoko_url: str | None = None
    openai_strong_model: str = "gpt-4.1-mini"
    openai_cheap_model: str = "gpt-4o-mini"
    openai_budget_monthly_usd: float = Field(150, ge=0)
    #: OpenAI-compatible endpoint for the openai/* aliases (a corporate proxy, Azure, a test
    #: double); None: api.openai.com.
    openai_api_base: str | None = None
    routing: RoutingPolicy = Field(default_factory=RoutingPolicy)


# --------------------------------------------------------------------------- role variables


class GpuNodeVars(Strict):
    """Variables of the ``gpu_node`` role: one vLLM server, launched as the seed launches it."""

    vllm_image: str
    #: Hugging Face model id vLLM loads (``--model``).
    model_hf_id: str
    #: Name vLLM serves the model under (``--served-model-name``); default: ``model_hf_id``.
    served_model_name: str | None = None
    #: Aliases of the gateway this host serves, e.g. ``[local/chat]``.
    serves: list[str] = Field(default_factory=list)
    vllm_host: str
    vllm_port: int = Field(ge=1, le=65535)
    #: Port published on the host (default: ``vllm_port``); lets test "hosts" share one engine.
    vllm_published_port: int | None = Field(None, ge=1, le=65535)
    quantization: str | None
    max_model_len: int = Field(gt=0)
    gpu_memory_utilization: float = Field(gt=0, le=1)
    #: GPUs to request: ``all``, or a count; 0 is a CPU-only / test host (no device request).
    gpu_count: int | Literal["all"]
    extra_args: list[str] = Field(default_factory=list)
    #: Host directory mounted as the Hugging Face cache (model weights survive recreation).
    hf_cache_dir: str
    #: Seconds the healthcheck tolerates failures while the model loads.
    health_start_period_s: int = Field(ge=0)
    #: Seconds between healthchecks (also how soon a fresh container can first be healthy).
    health_interval_s: int = Field(ge=1)
    health_probe: Literal["python", "curl", "wget"]
    shm_size: str | None = None
    #: vLLM wants unlimited memlock and a large stack; hosts that may not raise them set {}.
    ulimits: dict[str, int] = Field(default_factory=dict)
    environment: dict[str, str] = Field(default_factory=dict)

    @field_validator("serves")
    @classmethod
    def _serves(cls, value: list[str]) -> list[str]:
        for alias in value:
            if not re.match(ALIAS_RE, alias):
                raise ValueError(f"'{alias}' is not an alias of the form 'group/name'")
        return value

    @field_validator("gpu_count")
    @classmethod
    def _gpu_count(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("gpu_count must be 'all' or a count >= 0")
        return value

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model_hf_id

    @property
    def published_port(self) -> int:
        return self.vllm_published_port or self.vllm_port


class MotokoVars(Strict):
    """Variables of the ``motoko`` role: the LiteLLM gateway, its Redis and the embeddings slot.

    Besides the declared fields, the seed's per-backend overrides are accepted:
    ``<host>_base_url`` (api_base used for that host), ``<host>_model_hf_id`` and
    ``<host>_model_display`` (checked against what that host really serves; the host file is
    the one source of truth for the model, so they cannot disagree with it unnoticed).
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    litellm_version: str
    #: Full image reference; overrides ``litellm_version`` (pin by digest in production).
    litellm_image: str | None = None
    litellm_port: int = Field(ge=1, le=65535)
    litellm_bind: str
    litellm_workers: int = Field(ge=1)
    openai_api_key: SecretRef
    litellm_bearer_token: SecretRef
    redis_image: str
    #: Seconds between healthchecks of the gateway's containers.
    health_interval_s: int = Field(ge=1)
    embed_base_url: str
    embed_model: str
    embed_max_input_tokens: int = Field(gt=0)
    #: Extra ``router_settings`` merged into the generated LiteLLM config (linted).
    litellm_router_settings_extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _overrides(self) -> MotokoVars:
        for key in self.model_extra or {}:
            if not BACKEND_OVERRIDE_RE.match(key):
                raise ValueError(f"unknown key '{key}'")
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

    role: str = Field(pattern=ROLE_NAME_RE)
    #: How other hosts reach this one (DNS name or IP); default: the host's name.
    address: str | None = None
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
