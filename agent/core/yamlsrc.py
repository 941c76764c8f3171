"""YAML loading that remembers where every key came from.

Used by ``model`` to turn pydantic's error locations (``('vars', 'max_model_len')``) back into
``hosts/armitage.yaml:7``. Parsing uses libyaml's C loader when PyYAML was built with it
(about 10x faster than the pure-Python one). Duplicate keys are errors: PyYAML silently keeps
the last one, which would hide a typo'd override.
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
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return Document(name, None, LineMap())
        lines = LineMap()
        problems: list[Problem] = []
        _walk(node, (), lines, problems, name)
        if problems:
            raise DesiredStateError(problems)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        what = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise DesiredStateError.single(name, line, f"YAML syntax error: {what}") from None
    except yaml.YAMLError as exc:
        raise DesiredStateError.single(name, None, f"YAML error: {exc}") from None
    finally:
        loader.dispose()
    return Document(name, data, lines)


def _walk(node: yaml.Node, path: Path_, lines: LineMap, problems: list[Problem], name: str) -> None:
    lines.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append(Problem(name, line, f"duplicate key '{key}' (first on line {seen[key]})"))
            seen[key] = line
            lines.lines[(*path, key)] = line
            _walk(value_node, (*path, key), lines, problems, name)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*path, index), lines, problems, name)


def dump(data: Any) -> str:
    """Deterministic block-style YAML (keys in insertion order) for rendered files."""
    try:
        from yaml import CSafeDumper as dumper
    except ImportError:  # pragma: no cover
        from yaml import SafeDumper as dumper  # type: ignore[assignment]
    return yaml.dump(data, Dumper=dumper, sort_keys=False, default_flow_style=False, width=1000)
