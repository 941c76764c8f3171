"""Hostile desired state: nothing a pushed file holds may hang, exhaust memory, crash the agent
or make it read outside the tree. Each case is one located ``file:line: what``, exit 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.adapters.secrets import FileSecrets
from agent.cli.commands import main
from agent.core.errors import DesiredStateError, SecretError
from agent.core.yamlsrc import load
from agent.desired import sandbox

CANARY = "canary-7f3e-do-not-print"

#: A kilobyte that expands to 9**10 values: took minutes and gigabytes before the bound.
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(9)
)


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail (rather than hang the suite) if the body runs longer than ``seconds``."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def validate(repo: Path, capsys: pytest.CaptureFixture[str], seconds: float = 10) -> tuple[int, str]:
    with time_limit(seconds):
        code = main(["validate", "--repo", str(repo)])
    out, err = capsys.readouterr()
    return code, out + err


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """A file outside the desired-state tree whose text must never be shown."""
    path = tmp_path / "outside" / "private.yaml"
    path.parent.mkdir()
    path.write_text(f"role: gpu_node\nvars:\n  {CANARY}: {CANARY}\n")
    return path


# ------------------------------------------------------------------------------ YAML bounds


@pytest.mark.slow  # stress: resource bounds under hostile input; runs in CI
def test_alias_bomb_is_refused_quickly(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (repo / "hosts" / "armitage.yaml").write_text(
        "role: gpu_node\n" + "x:\n" + "".join(f"  {line}\n" for line in ALIAS_BOMB.splitlines())
    )
    start = time.monotonic()
    code, out = validate(repo, capsys)
    assert code == 1
    assert "hosts/armitage.yaml:" in out and "100000 values once aliases are expanded" in out
    assert time.monotonic() - start < 5


@pytest.mark.slow  # stress: resource bounds under hostile input; runs in CI
def test_merge_key_bomb_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    text = "a1: &a1 {k: 1}\n" + "".join(f"a{i + 1}: &a{i + 1} {{<<: [*a{i}, *a{i}]}}\n" for i in range(1, 40))
    with time_limit(5), pytest.raises(DesiredStateError, match="aliases are expanded"):
        load(text, "f.yaml")


def test_deep_nesting_is_a_located_error(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (repo / "hosts" / "armitage.yaml").write_text("role: gpu_node\nvars:\n  x: " + "[" * 1000 + "]" * 1000 + "\n")
    code, out = validate(repo, capsys)
    assert code == 1
    assert "hosts/armitage.yaml:3: nested more than 64 levels deep" in out
    assert "Traceback" not in out


@pytest.mark.slow  # stress: resource bounds under hostile input; runs in CI
def test_very_deep_nesting_does_not_crash_the_process(repo: Path) -> None:
    """libyaml's composer recurses in C: 30 000 levels (60 kB) was a segmentation fault."""
    (repo / "fleet.yaml").write_text("x: " + "[" * 200_000 + "]" * 200_000 + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "validate", "--repo", str(repo)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "fleet.yaml:1: nested more than 64 levels deep" in proc.stderr + proc.stdout


def test_self_referencing_alias_is_refused() -> None:
    with pytest.raises(DesiredStateError, match=r"f\.yaml:1: an alias refers to a collection that contains it"):
        load("a: &a [*a]\n", "f.yaml")


@pytest.mark.parametrize(
    "value",
    ["9" * 5000, "2001-13-45", "!!timestamp abc", "!!int abc", "2001-02-30"],
)
def test_values_python_cannot_build_are_located(value: str) -> None:
    with pytest.raises(DesiredStateError, match=r"^f.yaml:2: YAML error: cannot read this value"):
        load(f"a: 1\nx: {value}\n", "f.yaml")


def test_oversized_file_is_refused(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (repo / "hosts" / "armitage.yaml").write_text("role: gpu_node\n# " + "x" * (1 << 20) + "\n")
    code, out = validate(repo, capsys)
    assert code == 1
    assert "hosts/armitage.yaml: larger than the 1 MiB limit for a file" in out


def test_ordinary_anchors_and_merge_keys_still_work(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = load("base: &b {a: 1, l: &l [1, 2]}\ny: {<<: *b, c: *l}\n", "f.yaml")
    assert doc.data["y"] == {"a": 1, "l": [1, 2], "c": [1, 2]}
    assert doc.line_of("y", "c") == 2
    host = repo / "hosts" / "armitage.yaml"
    host.write_text(host.read_text().replace("serves: [local/chat]", "serves: &served [local/chat]"))
    code, out = validate(repo, capsys)
    assert code == 0, out


def test_duplicate_keys_are_still_reported_in_file_order() -> None:
    with pytest.raises(DesiredStateError) as info:
        load("a: 1\nb:\n  c: 1\n  c: 2\na: 2\n", "f.yaml")
    assert [str(p) for p in info.value.problems] == [
        "f.yaml:4: duplicate key 'c' (first on line 3)",
        "f.yaml:5: duplicate key 'a' (first on line 1)",
    ]


def test_host_secrets_file_uses_the_bounded_loader(tmp_path: Path) -> None:
    path = tmp_path / "secrets.yaml"
    path.write_text(ALIAS_BOMB)
    path.chmod(0o600)
    with time_limit(5), pytest.raises(SecretError, match="not valid YAML"):
        FileSecrets(path).has("x")
    path.write_bytes(b"token: \xff\xfe\n")
    with pytest.raises(SecretError, match="not valid YAML") as info:
        FileSecrets(path).has("x")
    assert "\\xff" not in str(info.value)


# ------------------------------------------------------------------------ reading the tree


def test_host_file_linked_outside_is_refused_silently(
    repo: Path, canary: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (repo / "hosts" / "evil.yaml").symlink_to(canary)
    code, out = validate(repo, capsys)
    assert code == 1
    assert "hosts/evil.yaml: is a link that leads outside the desired-state tree (refused)" in out
    assert CANARY not in out and str(canary) not in out


def test_hosts_folder_linked_outside_is_refused(repo: Path, canary: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.rename(repo / "hosts", repo / "hosts.real")
    (repo / "hosts").symlink_to(canary.parent)
    code, out = validate(repo, capsys)
    assert code == 1
    assert "hosts/private.yaml: is a link that leads outside" in out
    assert CANARY not in out


def test_links_inside_the_tree_are_followed(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.rename(repo / "hosts" / "armitage.yaml", repo / "armitage.yaml")
    (repo / "hosts" / "armitage.yaml").symlink_to("../armitage.yaml")
    code, out = validate(repo, capsys)
    assert code == 0, out


def test_fifo_is_refused_without_blocking(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (repo / "hosts" / "armitage.yaml").unlink()
    os.mkfifo(repo / "hosts" / "armitage.yaml")
    code, out = validate(repo, capsys, seconds=5)
    assert code == 1
    assert "hosts/armitage.yaml: not a regular file (refused)" in out


def test_non_utf8_host_file_names_the_line(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (repo / "hosts" / "armitage.yaml").write_bytes(b"role: gpu_node\nvars:\n  x: \xff\n")
    code, out = validate(repo, capsys)
    assert code == 1
    assert "hosts/armitage.yaml:3: not UTF-8 text (byte 0xff)" in out


@pytest.mark.parametrize("name", ["role.yaml", "defaults.yaml"])
def test_non_utf8_role_file_is_located(roles_copy: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    (roles_copy / "gpu_node" / name).write_bytes(b"# \xff\n")
    code, out = validate(roles_copy.parent, capsys)
    assert code == 1
    assert f"roles/gpu_node/{name}:1: not UTF-8 text" in out
    assert "Traceback" not in out


def test_role_folder_linked_outside_is_refused(
    roles_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.rename(roles_copy / "gpu_node", tmp_path / "gpu_node_elsewhere")
    (roles_copy / "gpu_node").symlink_to(tmp_path / "gpu_node_elsewhere")
    code, out = validate(roles_copy.parent, capsys)
    assert code == 1
    assert "roles/gpu_node: is a link that leads outside" in out


# ------------------------------------------------------------------ a fleet's broken role


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "roles/gpu_node/role.yaml: file not found"),
        (b"compose: [unclosed\n", "roles/gpu_node/role.yaml:2: YAML syntax error"),
        (b"bogus_key: 1\n", "roles/gpu_node/role.yaml:1: unknown key 'bogus_key'"),
        (b"\xff\n", "roles/gpu_node/role.yaml:1: not UTF-8 text"),
    ],
)
def test_broken_fleet_role_is_an_error_not_the_shipped_one(
    repo: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, expected: str
) -> None:
    role = repo / "roles" / "gpu_node"
    role.mkdir(parents=True)
    if content is not None:
        (role / "role.yaml").write_bytes(content)
    code, out = validate(repo, capsys)
    assert code == 1, out
    assert expected in out


# ----------------------------------------------------------------------------- templates


def add_to_compose(roles_copy: Path, text: str) -> None:
    compose = roles_copy / "gpu_node" / "templates" / "compose.yaml.j2"
    compose.write_text(text + "\n" + compose.read_text())


def test_include_of_a_link_outside_the_role_is_refused(
    roles_copy: Path, canary: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (roles_copy / "gpu_node" / "templates" / "passwd.j2").symlink_to(canary)
    add_to_compose(roles_copy, '# {% include "passwd.j2" %}')
    code, out = validate(roles_copy.parent, capsys)
    assert code == 1
    assert "roles/gpu_node/templates/passwd.j2: is a link that leads outside" in out
    assert CANARY not in out
    rendered = tmp_path / "rendered"
    code = main(["render", "--host", "armitage", "--repo", str(roles_copy.parent), "--out", str(rendered)])
    out, err = capsys.readouterr()
    assert code == 1
    assert CANARY not in out + err
    assert not any(CANARY in p.read_text() for p in rendered.rglob("*") if p.is_file())


def test_include_of_a_link_inside_the_role_works(roles_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    templates = roles_copy / "gpu_node" / "templates"
    (templates / "note.txt").write_text("# a note\n")
    (templates / "note.j2").symlink_to("note.txt")
    add_to_compose(roles_copy, '{% include "note.j2" %}')
    code, out = validate(roles_copy.parent, capsys)
    assert code == 0, out


@pytest.mark.slow  # stress: resource bounds under hostile input; runs in CI
def test_endless_template_loop_stops_with_a_located_error(
    roles_copy: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sandbox, "RENDER_SECONDS", 0.5)
    add_to_compose(roles_copy, "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}")
    start = time.monotonic()
    code, out = validate(roles_copy.parent, capsys)
    assert code == 1
    assert "roles/gpu_node/templates/compose.yaml.j2:1: template took longer than 0.5 s (a loop?)" in out
    assert time.monotonic() - start < 5


def test_default_render_budget_is_five_seconds() -> None:
    assert sandbox.RENDER_SECONDS == 5.0


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{% for i in range(100000) %}{% endfor %}", "range() of more than 10000 items"),
        ('{{ "x" * 100000000000 }}', "'*' would build more than"),
        ("{{ 10 ** 100000000 }}", "'**' would build an integer"),
        (
            '{% set ns = namespace(s="xx") %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}',
            "a string longer than",
        ),
        ('{% set ns = namespace(s="xx") %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}', "'+'"),
        ('{{ "x" | center(100000000000) }}', "a number larger than"),
        ('{{ "x".center(100000000000) }}', "a number larger than"),
        ('{{ ("x" * 100000) | replace("", "y" * 100000) }}', "replace would build"),
        ('{{ ("y" * 100000).join(range(10000)) }}', "join would build"),
        ('{{ range(10000) | join("y" * 100000) }}', "join would build"),
        ('{{ "%099999999d" % 1 }}', "format width"),
        ('{{ "{:>99999999}".format(1) }}', "format width"),
        ('{% for i in range(10000) %}{{ "x" * 1000000 }}{% endfor %}', "output is larger than 1 MiB"),
    ],
)
def test_templates_cannot_build_huge_values(
    roles_copy: Path, capsys: pytest.CaptureFixture[str], template: str, expected: str
) -> None:
    add_to_compose(roles_copy, "# " + template)
    code, out = validate(roles_copy.parent, capsys)
    assert code == 1, out
    assert f"roles/gpu_node/templates/compose.yaml.j2{'' if 'output' in expected else ':1'}: " in out
    assert expected in out


@pytest.mark.parametrize(
    "text",
    [
        "a:\n b:\n  c:\n   d: 1\n",
        "- - - - x\n",
        "-\n -\n  -\n   - x\n",
        "? [a, {b: [c]}]\n: v\n",
        "a: [[[[1]]]]\nb: {c: {d: {e: 1}}}\n",
        "- a: b\n  c:\n  - d: e\n    f: [g]\n",
        "x: |\n  text\n   more\n",
        "k: !!seq\n- - a\n",
    ],
)
def test_the_depth_bound_never_underestimates(text: str) -> None:
    """The cheap bound that lets small files skip the depth scan is never below the real depth."""
    import yaml

    from agent.core.yamlsrc import _depth_bound

    loader = yaml.SafeLoader(text)
    depth = deepest = 0
    while loader.check_event():
        event = loader.get_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            deepest = max(deepest, depth)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    loader.dispose()
    assert _depth_bound(text) >= deepest
