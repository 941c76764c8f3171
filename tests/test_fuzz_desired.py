"""Fuzzing ``agent validate`` with hostile desired-state files: random bytes and unicode, deep
nesting, anchors and aliases, wrong types, unknown keys, huge numbers, written as
``fleet.yaml`` or a host file into a copy of the shipped example.

Whatever the input: no exception escapes ``main`` (it returns an int), each example finishes
within the deadline, and the exit code is 0 (valid) or 1 with a message."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cli.commands import main

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("fleet.yaml", "hosts/armitage.yaml", "hosts/motoko.yaml", "hosts/fuzzed.yaml")

KEYS = st.sampled_from(
    ["role", "vars", "address", "motoko", "routing", "models", "serves", "max_model_len", "model_hf_id", "x", "<<"]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["gpu_node", "motoko", "local/chat", "9" * 5000, "2001-13-45", "!!binary zz", "~", "1e999"]),
)
STRUCTURES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.one_of(KEYS, st.text(max_size=8)), children, max_size=4)
    ),
    max_leaves=20,
)
# Raw text: YAML-looking fragments, random unicode, bytes that are not UTF-8.
FRAGMENTS = st.sampled_from(
    [
        "role: gpu_node\n",
        "vars:\n",
        "  serves: [local/chat]\n",
        "  max_model_len: 99999999999999999999999\n",
        "&a [1, 2]\n",
        "*a\n",
        "<<: *a\n",
        "? [a]\n: 1\n",
        "!!python/object:os.system\n",
        "{{{{[[[[",
        "]]}}",
        ": : :\n",
        "\t- x\n",
        "a: &a [*a]\n",
        "key: 'unterminated\n",
        "%YAML 1.1\n---\n",
        "--- \n...\n",
    ]
)
RAW = st.one_of(
    st.lists(FRAGMENTS, max_size=8).map(lambda parts: "".join(parts).encode()),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=200),
)


def _dump(data: Any) -> bytes:
    return yaml.safe_dump(data, allow_unicode=True).encode("utf-8", "surrogatepass")


def _nested(depth: int) -> bytes:
    return ("x: " + "[" * depth + "]" * depth + "\n").encode()


def _bomb(levels: int) -> bytes:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return ("\n".join(lines) + "\n").encode()


CONTENT = st.one_of(
    RAW,
    STRUCTURES.map(_dump),
    st.fixed_dictionaries({"role": st.sampled_from(["gpu_node", "motoko"]), "vars": STRUCTURES}).map(_dump),
    st.integers(min_value=1, max_value=3000).map(_nested),
    st.integers(min_value=1, max_value=9).map(_bomb),
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("fuzz") / "desired_state"
    shutil.copytree(ROOT / "desired_state", dest)
    return dest


def run_validate(repo: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["validate", "--repo", str(repo)])
    out, err = capsys.readouterr()
    return code, out + err


def check(pristine: Path, capsys: pytest.CaptureFixture[str], target: str, content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "desired_state"
        shutil.copytree(pristine, repo)
        (repo / target).write_bytes(content)
        code, out = run_validate(repo, capsys)
    assert isinstance(code, int)
    assert code in (0, 1), out
    assert "Traceback" not in out
    if code == 1:
        assert out.strip(), "invalid but nothing said"
        assert "invalid:" in out or "error" in out.lower() or ": " in out
    else:
        assert "valid:" in out


@pytest.mark.slow  # fuzzing: runs in CI (scripts/test), not in the fast suite
@settings(
    max_examples=150,
    deadline=2000,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(target=st.sampled_from(TARGETS), content=CONTENT)
def test_validate_never_escapes(
    pristine: Path, capsys: pytest.CaptureFixture[str], target: str, content: bytes
) -> None:
    check(pristine, capsys, target, content)


@pytest.mark.slow  # stress: resource bounds under hostile input; runs in CI
@pytest.mark.parametrize(
    ("target", "content", "expected"),
    [
        ("hosts/armitage.yaml", _bomb(9), "aliases are expanded"),
        ("fleet.yaml", _bomb(9), "aliases are expanded"),
        ("hosts/armitage.yaml", _nested(1000), "nested more than 64 levels deep"),
        ("fleet.yaml", _nested(1000), "nested more than 64 levels deep"),
    ],
)
def test_fixed_hostile_examples(
    pristine: Path, capsys: pytest.CaptureFixture[str], target: str, content: bytes, expected: str
) -> None:
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "desired_state"
        shutil.copytree(pristine, repo)
        (repo / target).write_bytes(content)
        code, out = run_validate(repo, capsys)
    assert code == 1
    assert f"{target}:" in out and expected in out
    assert time.monotonic() - start < 5
