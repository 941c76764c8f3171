"""The Jinja sandbox templates run in, bounded in what they read, how long they run and how
much they produce.

A fleet may carry its own roles, so a template is as hostile as any pushed file:

- it is read through ``files.read_text`` (``RoleLoader``): an ``{% include %}`` of a link out
  of the role folder is refused, as are FIFOs, huge and non-UTF-8 files;
- each template gets ``RENDER_SECONDS`` of wall time, checked on every line the template's
  compiled code runs (``Budget``, a ``sys.settrace`` hook that traces only template frames):
  a nested loop that would spin for hours stops with a located error;
- nothing it builds may exceed ``MAX_OUTPUT`` characters: ``*``, ``**``, ``+``, ``%`` and ``~``
  are checked before they run, so are the filters and string methods that grow text
  (``center``, ``indent``, ``replace``, ``join``, ``format`` ...), and every joined output;
- ``range`` is capped at ``MAX_RANGE`` items and ``lipsum`` is gone.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import Any

import jinja2
import jinja2.compiler
import jinja2.nodes
import jinja2.runtime
import jinja2.sandbox
from jinja2.loaders import split_template_path

from agent.core.roles import Role
from agent.desired import files

#: Wall time one template may take to render, seconds.
RENDER_SECONDS = 5.0
#: Longest string (or list) a template may build, and longest output.
MAX_OUTPUT = 1 << 20
#: Longest ``range()``.
MAX_RANGE = 10_000
#: Biggest integer (in bits) ``*`` and ``**`` may produce.
MAX_INT_BITS = 100_000

_WIDE = re.compile(r"\d{7,}")  # a format width of a million or more


class LimitExceeded(Exception):
    """A template went past one of the limits above; the message says which."""


class RoleLoader(jinja2.BaseLoader):
    """The role's ``templates/``, read through ``files.read_text`` (inside the role folder)."""

    def __init__(self, role: Role) -> None:
        self.role = role

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str, Callable[[], bool]]:
        pieces = split_template_path(template)  # refuses '..'
        rel = "/".join(["templates", *pieces])
        if not files.exists(self.role.root, rel):
            raise jinja2.TemplateNotFound(template)
        text = files.read_text(self.role.root, rel, f"{self.role.shown}/{rel}")
        return text, str(self.role.templates.joinpath(*pieces)), lambda: True


class _CodeGenerator(jinja2.compiler.CodeGenerator):
    """Compiles ``a ~ b`` through the environment's bounded ``concat``."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: jinja2.compiler.Frame) -> None:
        self.write("concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The immutable sandbox, with every way of growing a value checked before it runs."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _CodeGenerator

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.concat = _concat  # type: ignore[method-assign]
        self.globals.pop("lipsum", None)
        self.globals["range"] = _range
        for name, check in _FILTER_CHECKS.items():
            self.filters[name] = _guard(self.filters[name], check)

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return _sized(super().call_binop(context, operator, left, right))

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_numbers(args, kwargs)
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            args = _check_str_method(owner, getattr(__obj, "__name__", ""), args)
        return _sized(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        owner = getattr(value, "__self__", None)
        if isinstance(owner, str) and _WIDE.search(owner):
            raise LimitExceeded("a format width of a million or more")
        return super().wrap_str_format(value)


def render(template: jinja2.Template, context: dict[str, Any], budget: Budget) -> str:
    """Render within ``budget``, stopping as soon as the output passes ``MAX_OUTPUT``."""
    out: list[str] = []
    size = 0
    with budget:
        for piece in template.generate(context):
            size += len(piece)
            if size > MAX_OUTPUT:
                raise LimitExceeded(f"template output is larger than {MAX_OUTPUT >> 20} MiB")
            out.append(piece)
    return "".join(out)


class Budget:
    """Raises ``LimitExceeded`` on the first line a template runs past its deadline.

    Only frames compiled from files under ``prefix`` are traced (Jinja compiles a template to
    Python code whose file name is the template's path), so the cost outside templates is one
    call per Python function call. The previous trace function is restored on exit."""

    def __init__(self, prefix: Path, seconds: float) -> None:
        self.prefix = os.path.join(str(prefix), "")  # the folder itself, not a sibling "templates2"
        self.seconds = seconds
        self.deadline = 0.0
        self.previous: Any = None

    def __enter__(self) -> Budget:
        self.deadline = time.monotonic() + self.seconds
        self.previous = sys.gettrace()
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self.previous)

    def _call(self, frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename.startswith(self.prefix):
            return self._line
        return None

    def _line(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line" and time.monotonic() > self.deadline:
            raise LimitExceeded(f"template took longer than {self.seconds:g} s (a loop?)")
        return self._line


# ---------------------------------------------------------------------------- the checks


def _sized(value: Any) -> Any:
    if isinstance(value, str | bytes | list | tuple | dict | set) and len(value) > MAX_OUTPUT:
        raise LimitExceeded(f"a value larger than {MAX_OUTPUT} items or characters")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise LimitExceeded(f"an integer larger than {MAX_INT_BITS} bits")
    return value


def _concat(values: Iterable[Any]) -> str:
    parts = [v if isinstance(v, str) else str(v) for v in values]
    if sum(map(len, parts)) > MAX_OUTPUT:
        raise LimitExceeded(f"a string longer than {MAX_OUTPUT} characters")
    return "".join(parts)


def _range(*args: int) -> range:
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise LimitExceeded(f"range() of more than {MAX_RANGE} items")
    return rng


def _length(value: Any) -> int | None:
    return len(value) if isinstance(value, str | bytes | list | tuple) else None


def _check_binop(operator: str, left: Any, right: Any) -> None:
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            size = _length(seq)
            if size is not None and isinstance(n, int) and size * n > MAX_OUTPUT:
                raise LimitExceeded(f"'*' would build more than {MAX_OUTPUT} items or characters")
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise LimitExceeded(f"'*' would build an integer larger than {MAX_INT_BITS} bits")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and left.bit_length() * right > MAX_INT_BITS:
            raise LimitExceeded(f"'**' would build an integer larger than {MAX_INT_BITS} bits")
    elif operator == "+":
        a, b = _length(left), _length(right)
        if a is not None and b is not None and a + b > MAX_OUTPUT:
            raise LimitExceeded(f"'+' would build more than {MAX_OUTPUT} items or characters")
    elif operator == "%" and isinstance(left, str) and _WIDE.search(left):
        raise LimitExceeded("a format width of a million or more")


def _check_numbers(args: Iterable[Any], kwargs: dict[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_OUTPUT:
            raise LimitExceeded(f"a number larger than {MAX_OUTPUT} passed to a call")


def _check_str_method(owner: str, name: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    if name == "join" and args:
        args = (_items(args[0]), *args[1:])
    if name == "replace" and len(args) >= 2:
        _check_replace(owner, args[0], args[1])
    elif name == "join" and args:
        items = args[0]
        count = len(items) if isinstance(items, str | list | tuple | dict | set | range) else 0
        if count * len(owner) > MAX_OUTPUT:
            raise LimitExceeded(f"join would build more than {MAX_OUTPUT} characters")
    elif name == "expandtabs" and args and isinstance(args[0], int) and owner.count("\t") * args[0] > MAX_OUTPUT:
        raise LimitExceeded(f"expandtabs would build more than {MAX_OUTPUT} characters")
    return args


def _check_replace(value: Any, old: Any, new: Any) -> None:
    if isinstance(value, str) and isinstance(old, str) and isinstance(new, str):
        hits = value.count(old) if old else len(value) + 1
        if len(value) + hits * len(new) > MAX_OUTPUT:
            raise LimitExceeded(f"replace would build more than {MAX_OUTPUT} characters")


def _filter_replace(value: Any, *args: Any) -> Any:
    if len(args) >= 2:
        _check_replace(value, args[0], args[1])
    return value


def _filter_indent(value: Any, *args: Any) -> Any:
    width = args[0] if args else 4
    size = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    if isinstance(value, str) and (value.count("\n") + 1) * size > MAX_OUTPUT:
        raise LimitExceeded(f"indent would build more than {MAX_OUTPUT} characters")
    return value


def _filter_join(value: Any, *args: Any) -> Any:
    items = _items(value)
    sep = args[0] if args and isinstance(args[0], str) else ""
    if len(items) * len(sep) > MAX_OUTPUT:
        raise LimitExceeded(f"join would build more than {MAX_OUTPUT} characters")
    return items


def _filter_format(value: Any, *args: Any) -> Any:
    if isinstance(value, str) and _WIDE.search(value):
        raise LimitExceeded("a format width of a million or more")
    return value


def _no_check(value: Any, *args: Any) -> Any:
    return value


def _items(value: Any) -> Any:
    """``value`` if it has a length, else its items as a list (so a join can be measured)."""
    if isinstance(value, str | list | tuple | dict | set | range | jinja2.Undefined):
        return value
    try:
        return list(value)
    except TypeError:
        return value


#: Filters that can grow a value from small arguments, and what to check first (every one of
#: them also gets the number check on its arguments and the size check on its result).
_FILTER_CHECKS: dict[str, Callable[..., Any]] = {
    "center": _no_check,
    "indent": _filter_indent,
    "replace": _filter_replace,
    "join": _filter_join,
    "format": _filter_format,
    "batch": _no_check,
    "slice": _no_check,
    "wordwrap": _no_check,
    "truncate": _no_check,
}


def _guard(f: Callable[..., Any], check: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap filter ``f``: check its arguments before (``check`` returns the value to use,
    an iterator made a list so it can be measured), the size of its result after."""
    passed = getattr(f, "jinja_pass_arg", None)  # pass_eval_context / pass_environment

    def guarded(*args: Any, **kwargs: Any) -> Any:
        rest = args[1:] if passed is not None else args  # the value comes after the context
        if rest:
            _check_numbers(rest[1:], kwargs)
            value = check(rest[0], *rest[1:])
            args = (*args[: len(args) - len(rest)], value, *rest[1:])
        return _sized(f(*args, **kwargs))

    if passed is not None:
        guarded.jinja_pass_arg = passed  # type: ignore[attr-defined]
    return guarded
