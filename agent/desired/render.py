"""Renders one host's stack from its role's templates, in a sandbox, strictly.

Templates run in Jinja2's immutable sandbox with ``StrictUndefined``: a missing variable is
an error carrying the template path, line and the lines around it, never an empty string.
The rendered compose text is parsed into our typed ``StackSpec`` (``agent.core.stack``).

Secrets: a ``{secret: NAME}`` variable can be used only in the files the role marks
``secret`` (the 0600 env file); anywhere else (the compose file, the proxy config, even through
a filter such as ``| upper``) using it is a template error. In a secret file it renders as
``**REDACTED**`` unless ``reveal`` is set. Values are resolved through the ``Secrets`` port
(``agent.core.ports``); no message ever quotes one.
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
                f"secret '{self.name}' used outside the role's secret file (secrets may go only in a file "
                "role.yaml marks 'secret: true')"
            )
        return self._value if self._value is not None else REDACTED

    def __html__(self) -> str:  # pragma: no cover - autoescape is off
        return str(self)


def render_host(
    desired: DesiredState,
    host_name: str,
    secrets: Secrets,
    *,
    reveal: bool = False,
    prefix: str = "",
    health: Mapping[str, Health] | None = None,
    budget_exceeded: bool = False,
) -> RenderedStack:
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

    env = _environment(role)
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


def _environment(role: Role) -> jinja2.Environment:
    env = sandbox.BoundedSandbox(
        loader=sandbox.RoleLoader(role),
        bytecode_cache=_COMPILED,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["to_yaml"] = lambda value: dump(value).rstrip("\n")
    # Jinja's own tojson escapes quotes for HTML; plain JSON is valid YAML and easier to read.
    env.filters["tojson"] = _tojson
    return env


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
                    where, None, "a secret value would be written here; secrets belong only in the role's env file"
                )
