"""docs/reference.md is generated from the models (scripts/gen-reference) and cannot drift.

The committed file must be what the generator writes now; every field of every model (walked
here independently of the generator) must have a row; and a field added to a model must show
up, with its type, default and ``#:`` comment, and make ``--check`` fail.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field
from typing_extensions import is_typeddict

from agent.core import model, roles
from agent.node import settings

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gen-reference"
REFERENCE = ROOT / "docs" / "reference.md"


def _load() -> types.ModuleType:
    loader = importlib.machinery.SourceFileLoader("gen_reference", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gen_reference", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_reference", module)
    loader.exec_module(module)
    return module


gen = _load()


def rows(markdown: str) -> dict[str, list[str]]:
    """``{dotted path: its cells}`` of every table row of the reference."""
    out: dict[str, list[str]] = {}
    for line in markdown.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            out[cells[0].strip("`")] = cells
    return out


def _nested(tp: Any) -> Any:
    if typing.get_origin(tp) is list:
        return _nested(typing.get_args(tp)[0])
    if isinstance(tp, type) and tp is not model.SecretRef and (issubclass(tp, BaseModel) or is_typeddict(tp)):
        return tp
    return None


def expected_paths(cls: Any, prefix: str = "") -> set[str]:
    """Every key of ``cls`` and of the models and TypedDicts it nests, as dotted paths."""
    if is_typeddict(cls):
        return {prefix + name for name in typing.get_type_hints(cls)}
    out = set()
    for name, info in cls.model_fields.items():
        out.add(prefix + name)
        nested = _nested(info.annotation)
        if nested is not None:
            sub = f"{prefix}{name}[]." if typing.get_origin(info.annotation) is list else f"{prefix}{name}."
            out |= expected_paths(nested, sub)
    return out


def all_expected() -> set[str]:
    paths = expected_paths(settings.Settings) | expected_paths(model.Fleet) | expected_paths(model.HostFile)
    for cls in model.ROLE_VARS.values():
        paths |= expected_paths(cls, "vars.")
    return paths | expected_paths(model.SecretRef) | expected_paths(roles.RoleSpec)


def test_committed_reference_is_current() -> None:
    assert REFERENCE.read_text(encoding="utf-8") == gen.render(), "run scripts/gen-reference"


def test_every_field_of_every_model_has_a_row_with_type_and_default() -> None:
    documented = rows(gen.render())
    missing = all_expected() - set(documented)
    assert not missing
    for path in all_expected():
        cells = documented[path]
        assert all(cells[:-1]), f"{path}: an empty cell besides the description in {cells}"


def test_every_role_kind_and_nested_model_is_covered() -> None:
    paths = all_expected()
    assert {"routing.max_input_tokens", "files[].mode", "vars.litellm_router_settings_extra.num_retries"} <= paths
    assert "vars.gpu_count" in paths and "vars.litellm_port" in paths  # both ROLE_VARS kinds


def test_a_field_added_to_a_model_shows_up_and_check_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Fleet(model.Fleet):
        #: A knob added by the test.
        new_knob: int = Field(3, ge=1)

    monkeypatch.setattr(model, "Fleet", Fleet)
    cells = rows(gen.render())["new_knob"]
    assert cells == ["`new_knob`", "int >= 1", "`3`", "A knob added by the test."]
    assert gen.main(["--check"]) == 1
    assert "docs/reference.md is out of date with the models" in capsys.readouterr().err


def test_a_field_added_to_role_vars_or_settings_shows_up(monkeypatch: pytest.MonkeyPatch) -> None:
    class GpuNodeVars(model.GpuNodeVars):
        tensor_parallel_size: int | None = None

    class Settings(settings.Settings):
        #: Added by the test.
        report_interval: float = Field(10.0, gt=0)

    monkeypatch.setitem(model.ROLE_VARS, "backend", GpuNodeVars)
    monkeypatch.setattr(settings, "Settings", Settings)
    documented = rows(gen.render())
    assert documented["vars.tensor_parallel_size"][1:4] == ["int or null", "`null`", "-"]  # gpu_node: not set
    assert documented["report_interval"][1:5] == ["`AGENT_REPORT_INTERVAL`", "float > 0", "`10`", "Added by the test."]


def test_output_does_not_depend_on_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    before = gen.render()
    monkeypatch.setattr(settings, "_hostname", lambda: "some-other-machine")
    assert gen.render() == before
    assert "some-other-machine" not in before


@pytest.mark.parametrize(
    ("tp", "shown"),
    [
        (model.Port, "int >= 1, <= 65535"),
        (model.Seconds | None, "float > 0, <= 86400 or null"),
        (typing.Literal["python", "curl"], "one of `python` | `curl`"),
        (list[str], "list of str"),
        (dict[str, model.Ulimit], "mapping of str to int >= -1, <= 9223372036854775807"),
        (model.ApiBaseStr, "API base URL `http(s)://host[:port]/path` (e.g. `/v1`)"),
        (model.SecretRef, "secret reference `{secret: NAME}`"),
    ],
)
def test_types_are_human_readable(tp: Any, shown: str) -> None:
    assert gen.type_text(tp) == shown


def test_check_passes_on_a_current_file_and_fails_on_a_stale_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    current = tmp_path / "reference.md"
    current.write_text(gen.render(), encoding="utf-8")
    assert gen.main(["--check", "--file", str(current)]) == 0
    current.write_text(gen.render().replace("| `routing.cooldown_s`", "| `routing.cooldown`"), encoding="utf-8")
    assert gen.main(["--check", "--file", str(current)]) == 1
    err = capsys.readouterr().err
    assert "out of date with the models: run scripts/gen-reference" in err
    assert "+| `routing.cooldown_s`" in err  # the diff shows what the models say
