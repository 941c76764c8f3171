"""Renders one host's stack from its role's templates, in a sandbox, strictly.

Templates run in Jinja2's immutable sandbox with ``StrictUndefined``: a missing variable is
an error carrying the template path, line and the lines around it, never an empty string.
The rendered compose text is parsed into our typed ``StackSpec`` (``agent.core.stack``).

Secrets: a ``{secret: NAME}`` variable can be used only in the files the role marks
``secret`` (0600: the env file, the gateway's proxy config); anywhere else (the compose file,
even through a filter such as ``| upper``) using it is a template error. In a secret file it
renders as ``**REDACTED**`` unless ``reveal`` is set. ``with_master_key`` puts one into the
proxy config (``general_settings.master_key``): a rotated key is then a config change, which
the gateway reloads in place, not an environment change, which recreates the container.
With ``custom_auth=`` it also lists the keys the proxy accepts, as SHA-256 digests, for the
role's auth module (``roles/motoko/templates/fleet_auth.py``): the key, and during a rotation
the previous one (``previous_master_key``: the master key of the config on disk, an input of
the render). Values are resolved through the ``Secrets`` port (``agent.core.ports``); no message ever
quotes one.
"""

from __future__ import annotations

import json
import threading
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jinja2
import jinja2.bccache

from agent.core.bearer import ACCEPTED_KEYS_SETTING, accepted_keys, key_digest
from agent.core.errors import DesiredStateError, Problem
from agent.core.fleet import DesiredState
from agent.core.model import Host, SecretRef
from agent.core.ports import Secrets
from agent.core.redact import REDACTED, scrub
from agent.core.rendered import RenderedStack, project_name
from agent.core.roles import Role
from agent.core.routing import Decision, Health, backends, decide, front_timeout_s, graceful_shutdown_s, litellm_config
from agent.core.stack import StackFile, parse_compose
from agent.core.yamlsrc import dump, load
from agent.desired import sandbox


class SecretMisuse(Exception):
    """A secret was used in a file the role does not mark as secret."""


class Secret:
    """What a template sees for a secret variable: the value only when revealing, and only in
    a secret file (``confined``: any use at all is an error)."""

    __slots__ = ("_confined", "_value", "name")

    def __init__(self, name: str, value: str | None, confined: bool = False) -> None:
        self.name = name
        self._value = value
        self._confined = confined

    def confine(self) -> Secret:
        return Secret(self.name, None, confined=True)

    def __str__(self) -> str:
        if self._confined:
            raise SecretMisuse(
                f"secret '{self.name}' used outside the role's secret files (secrets may go only in a file "
                "role.yaml marks 'secret: true')"
            )
        return self._value if self._value is not None else REDACTED

    def __html__(self) -> str:  # pragma: no cover - autoescape is off
        return str(self)


def render_host(  # noqa: PLR0913  (keyword-only: the inputs of one render)
    desired: DesiredState,
    host_name: str,
    secrets: Secrets,
    *,
    reveal: bool = False,
    prefix: str = "",
    health: Mapping[str, Health] | None = None,
    budget_exceeded: bool = False,
    previous_master_key: str | None = None,
) -> RenderedStack:
    """``previous_master_key``: the gateway's master key in the proxy config now on disk (a
    pass reads it from the stack dir); while it differs from the new key, the rendered config
    accepts both (``accepted_keys``). Same inputs, same bytes."""
    host = desired.host(host_name)
    role = desired.roles[host.role]
    project = project_name(host.name, prefix)
    problems: list[Problem] = []

    context = _context(desired, host, project, prefix)
    decisions: Mapping[str, Decision] = {}
    if host.kind == "gateway":
        table, _ = backends(desired.fleet, desired.hosts)
        decisions = decide(desired.fleet.routing, table, health, budget_exceeded)
        context["routing"] = decisions
        context["litellm_config"] = litellm_config(desired.fleet, decisions, host.motoko.litellm_router_settings_extra)
        context["graceful_shutdown_timeout_s"] = graceful_shutdown_s(desired.fleet.routing)
        context["front_timeout_s"] = front_timeout_s(desired.fleet.routing)

    # Secret variables: resolved (reveal) or redacted; a missing one is a located error.
    for key, value in list(context.items()):
        if isinstance(value, SecretRef):
            if not secrets.declared(value.secret):
                doc = desired.doc(host.name)
                problems.append(
                    Problem(
                        host.file,
                        doc.line_of("vars", key) or role.defaults_doc.line_of(key),
                        f"secret '{value.secret}' (for '{key}') not found; looked in {secrets.where(value.secret)}",
                    )
                )
                context[key] = Secret(value.secret, None)
            else:
                context[key] = Secret(value.secret, secrets.value(value.secret) if reveal else None)
    if problems:
        raise DesiredStateError(problems)

    previous = Secret("previous master key", previous_master_key if reveal else None)
    env = _environment(role, previous if previous_master_key is not None else None)
    confined = {k: v.confine() if isinstance(v, Secret) else v for k, v in context.items()}
    hide = secrets.known_values
    files: dict[str, StackFile] = {}
    for rf in role.spec.files:
        text = _render_hiding(hide, env, role, rf.template, context if rf.secret else confined)
        files[rf.path] = StackFile(path=rf.path, content=text, mode=int(rf.mode, 8), secret=rf.secret)
    compose_text = _render_hiding(hide, env, role, role.spec.compose, confined)

    if reveal:
        _refuse_leaks(secrets, files, compose_text, f"{role.shown}/templates/{role.spec.compose}")

    compose_name = f"{role.shown}/templates/{role.spec.compose} (rendered for {host.name})"
    doc = load(compose_text, compose_name)
    stack = parse_compose(doc, project, files)
    return RenderedStack(host.name, host.role, project, compose_text, stack, decisions)


def _context(desired: DesiredState, host: Host, project: str, prefix: str) -> dict[str, Any]:
    variables = dict(host.vars)  # field values, SecretRef objects kept as they are
    variables.update(host.vars.model_extra or {})
    if host.kind == "backend":
        variables["served_model_name"] = host.gpu.served_name
        variables["vllm_published_port"] = host.gpu.published_port
    else:
        variables["litellm_image_ref"] = host.motoko.image  # litellm_image, else the tag of litellm_version
    return {
        **variables,
        "host": host.name,
        "address": host.address,
        "role": host.role,
        "project": project,
        "project_prefix": prefix,
        "fleet": desired.fleet.model_dump(),
    }


class _CompiledTemplates(jinja2.BytecodeCache):
    """Compiled templates shared by every render of this process, keyed by template name and
    file and checked against the source's checksum (jinja's own bucket logic): a role's
    templates are compiled once, not on every pass, and an edited template is compiled again."""

    MAX = 256

    def __init__(self) -> None:
        self._store: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def load_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        with self._lock:
            data = self._store.get(bucket.key)
        if data is not None:
            bucket.bytecode_from_string(data)

    def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        with self._lock:
            if len(self._store) >= self.MAX:
                self._store.clear()
            self._store[bucket.key] = bucket.bytecode_to_string()


_COMPILED = _CompiledTemplates()


def _environment(role: Role, previous_key: Secret | None = None) -> jinja2.Environment:
    env = sandbox.BoundedSandbox(
        loader=sandbox.RoleLoader(role),
        bytecode_cache=_COMPILED,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["to_yaml"] = lambda value: dump(_plain(value)).rstrip("\n")
    env.filters["with_master_key"] = lambda config, key, custom_auth=None: _with_master_key(
        config, key, custom_auth, previous_key
    )
    # Jinja's own tojson escapes quotes for HTML; plain JSON is valid YAML and easier to read.
    env.filters["tojson"] = _tojson
    return env


def _with_master_key(
    config: Mapping[str, Any], key: Secret | str, custom_auth: str | None = None, previous: Secret | None = None
) -> dict[str, Any]:
    """The LiteLLM config with ``general_settings.master_key`` set to ``key`` (a secret: its
    value, ``**REDACTED**``, or an error outside a secret file, as ``to_yaml`` writes it).

    With ``custom_auth`` (``module.function``, a module the role writes next to the config),
    LiteLLM asks that function instead, and the accepted keys are listed as digests under
    ``ACCEPTED_KEYS_SETTING``: ``accepted_keys(key, previous)`` (unrevealed: ``**REDACTED**``)."""
    general = dict(config.get("general_settings") or {})
    general["master_key"] = key
    if custom_auth is not None:
        new, old = _revealed(key), _revealed(previous) if previous is not None else None
        general["custom_auth"] = custom_auth
        if new is None or (previous is not None and old is None):
            general[ACCEPTED_KEYS_SETTING] = [REDACTED]  # not revealed: neither key is known
        else:
            general[ACCEPTED_KEYS_SETTING] = [key_digest(k) for k in accepted_keys(new, old)]
    return {**config, "general_settings": general}


def _revealed(value: Secret | str) -> str | None:
    """A key's value; ``None`` when redacted (raises where the secret is confined)."""
    text = str(value)
    return None if isinstance(value, Secret) and text == REDACTED else text


def _plain(value: Any) -> Any:
    """``value`` with every ``Secret`` in it as its text (which refuses where it is confined)."""
    if isinstance(value, Secret):
        return str(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _tojson(value: Any) -> str:
    if isinstance(value, jinja2.Undefined):
        value._fail_with_undefined_error()  # StrictUndefined: the located "is undefined" error
    return json.dumps(value, ensure_ascii=False)


def _render_hiding(
    hide: Callable[[], list[str]], env: jinja2.Environment, role: Role, name: str, context: dict[str, Any]
) -> str:
    """``_render``, with every secret value resolved so far scrubbed from its error messages
    (a filter's error quotes its input: ``invalid literal for int(): 'sk-...'``)."""
    try:
        return _render(env, role, name, context)
    except DesiredStateError as exc:
        values = hide()
        raise DesiredStateError(
            Problem(p.file, p.line, scrub(p.message, values), p.severity) for p in exc.problems
        ) from None


def _render(env: jinja2.Environment, role: Role, name: str, context: dict[str, Any]) -> str:
    shown = f"{role.shown}/templates/{name}"
    path = str(role.templates / name)
    try:
        return sandbox.render(env.get_template(name), context, sandbox.Budget(role.templates, sandbox.RENDER_SECONDS))
    except DesiredStateError:
        raise  # the loader refused a file (a link out of the role, not UTF-8 ...): already located
    except sandbox.LimitExceeded as exc:
        raise _template_error(shown, path, _template_line(exc, path), str(exc)) from None
    except jinja2.TemplateSyntaxError as exc:
        raise _template_error(shown, path, exc.lineno, f"template syntax error: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise _template_error(shown, path, _template_line(exc, path), f"template error: {exc.message or exc}") from None
    except Exception as exc:  # a filter or test blew up inside the template
        raise _template_error(
            shown, path, _template_line(exc, path), f"template error: {type(exc).__name__}: {exc}"
        ) from None


def _template_line(exc: BaseException, path: str) -> int | None:
    """Jinja rewrites tracebacks so frames in the template carry template line numbers."""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == path:
            line = frame.lineno
    return line


def _template_error(shown: str, path: str, line: int | None, message: str) -> DesiredStateError:
    if line:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:  # pragma: no cover
            lines = []
        lo, hi = max(1, line - 2), min(len(lines), line + 2)
        around = "\n".join(f"  {'>' if n == line else ' '} {n:4} | {lines[n - 1]}" for n in range(lo, hi + 1))
        if around:
            message = f"{message}\n{around}"
    return DesiredStateError.single(shown, line, message)


def _refuse_leaks(secrets: Secrets, files: dict[str, StackFile], compose: str, compose_name: str) -> None:
    values = [v for v in secrets.known_values() if len(v) >= 4]
    places = [(f.path, f.content) for f in files.values() if not f.secret] + [(compose_name, compose)]
    for where, text in places:
        for value in values:
            if value in text:
                raise DesiredStateError.single(
                    where, None, "a secret value would be written here; secrets belong only in the role's secret files"
                )
