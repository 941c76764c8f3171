"""YAML loading that remembers where every key came from.

Used by ``model`` to turn pydantic's error locations (``('vars', 'max_model_len')``) back into
``hosts/armitage.yaml:7``. Parsing uses libyaml's C loader when PyYAML was built with it
(about 10x faster than the pure-Python one). Duplicate keys are errors: PyYAML silently keeps
the last one, which would hide a typo'd override.

Loading is bounded, so a hostile file cannot hang the agent, exhaust its memory or crash it:
at most ``MAX_BYTES`` of text, ``MAX_DEPTH`` levels of nesting (checked on the event stream
before libyaml composes the tree: its composer recurses in C and segfaults around 30 000
levels) and ``MAX_NODES`` values once aliases are expanded (a kilobyte of nested aliases
expands to billions). Each limit is a located ``DesiredStateError`` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from agent.core.errors import DesiredStateError, Problem

try:  # pragma: no cover - depends on how PyYAML was built
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

Path_ = tuple[str | int, ...]

#: Largest desired-state document, in bytes (characters, for text already decoded).
MAX_BYTES = 1 << 20
#: Deepest nesting of mappings and lists (aliases included).
MAX_DEPTH = 64
#: Most values (keys excluded) a document may hold once every alias is expanded.
MAX_NODES = 100_000


class _Bounded(_Loader):
    """The safe loader, where a value that Python cannot build (``2001-13-45``, an integer of
    5 000 digits, ``!!int abc``) is a located YAML error instead of a bare ``ValueError``."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
            what = str(exc)[:200] or type(exc).__name__
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value: {what}", node.start_mark
            ) from None


@dataclass(slots=True)
class LineMap:
    """Maps a path of keys/indexes inside a document to the 1-based line it starts on."""

    lines: dict[Path_, int] = field(default_factory=dict)

    def line_of(self, path: Path_) -> int | None:
        """Line of the longest known prefix of ``path`` (the closest thing we can point at)."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return None


@dataclass(slots=True)
class Document:
    """A parsed YAML file: its data, where each part came from, and its display name."""

    name: str
    data: Any
    lines: LineMap

    def line_of(self, *path: str | int) -> int | None:
        return self.lines.line_of(tuple(path))


def load(text: str, name: str) -> Document:
    """Parse one YAML document; raises ``DesiredStateError`` naming ``name`` and the line."""
    if len(text) > MAX_BYTES:
        raise DesiredStateError.single(name, None, f"larger than the {MAX_BYTES >> 20} MiB limit for a file")
    try:
        _check_depth(text, name)
        loader = _Bounded(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return Document(name, None, LineMap())
            lines = LineMap()
            _walk(node, lines, name)
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        what = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        kind = "YAML error" if isinstance(exc, yaml.constructor.ConstructorError) else "YAML syntax error"
        raise DesiredStateError.single(name, line, f"{kind}: {what}") from None
    except yaml.YAMLError as exc:
        raise DesiredStateError.single(name, None, f"YAML error: {exc}") from None
    return Document(name, data, lines)


def _depth_bound(text: str) -> int:
    """An upper bound on how deep ``text`` can nest, without parsing it: a block collection
    one level deeper is indented further (at least a column), and everything else that opens
    a level has its own mark (``[``, ``{``, ``- ``, ``-`` at a line's end, ``? ``)."""
    indent = max((len(line) - len(line.lstrip(" ")) for line in text.splitlines()), default=0)
    marks = text.count("[") + text.count("{") + text.count("- ") + text.count("-\n") + text.count("? ")
    return indent + marks + 1


def _check_depth(text: str, name: str) -> None:
    """Refuse nesting deeper than ``MAX_DEPTH`` from the parser's events (iterative, cheap),
    before anything recursive sees the document. Most files cannot nest that deep at all
    (``_depth_bound``) and skip the scan."""
    if _depth_bound(text) <= MAX_DEPTH:
        return
    loader = _Loader(text)
    depth = 0
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    line = event.start_mark.line + 1 if event.start_mark else None
                    raise DesiredStateError.single(name, line, f"nested more than {MAX_DEPTH} levels deep (the limit)")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    finally:
        loader.dispose()


def _walk(root: yaml.Node, lines: LineMap, name: str) -> None:
    """Record the line of every path, find duplicate keys; iterative, and bounded in depth and
    in values visited (so in what aliases can expand to)."""
    problems: list[Problem] = []
    stack: list[tuple[yaml.Node, Path_, tuple[int, ...]]] = [(root, (), ())]
    visited = 0
    while stack:
        node, path, above = stack.pop()
        line = node.start_mark.line + 1
        visited += 1
        if visited > MAX_NODES:
            raise DesiredStateError.single(
                name, line, f"more than {MAX_NODES} values once aliases are expanded (the limit; an alias bomb?)"
            )
        if id(node) in above:
            raise DesiredStateError.single(name, line, "an alias refers to a collection that contains it")
        if len(path) > MAX_DEPTH:
            raise DesiredStateError.single(
                name, line, f"nested more than {MAX_DEPTH} levels deep once aliases are expanded (the limit)"
            )
        lines.lines.setdefault(path, line)
        children = _children(node, path, lines, problems, name)
        if children:
            inner = (*above, id(node))
            stack.extend((child, child_path, inner) for child, child_path in reversed(children))
    if problems:
        problems.sort(key=lambda p: p.line or 0)  # in file order, as a reader meets them
        raise DesiredStateError(problems)


def _children(
    node: yaml.Node, path: Path_, lines: LineMap, problems: list[Problem], name: str
) -> list[tuple[yaml.Node, Path_]]:
    if isinstance(node, yaml.SequenceNode):
        return [(item, (*path, index)) for index, item in enumerate(node.value)]
    if not isinstance(node, yaml.MappingNode):
        return []
    children: list[tuple[yaml.Node, Path_]] = []
    seen: dict[Any, int] = {}
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode):
            # str() of a node is its whole (alias-expanded) repr: never build it.
            problems.append(Problem(name, line, "a key must be a plain value, not a list or mapping"))
            continue
        key = key_node.value
        if key in seen:
            problems.append(Problem(name, line, f"duplicate key '{key}' (first on line {seen[key]})"))
        seen[key] = line
        lines.lines[(*path, key)] = line
        children.append((value_node, (*path, key)))
    return children


def dump(data: Any) -> str:
    """Deterministic block-style YAML (keys in insertion order) for rendered files."""
    try:
        from yaml import CSafeDumper as dumper
    except ImportError:  # pragma: no cover
        from yaml import SafeDumper as dumper  # type: ignore[assignment]
    return yaml.dump(data, Dumper=dumper, sort_keys=False, default_flow_style=False, width=1000)
