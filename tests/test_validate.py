"""``agent validate``: the shipped example is valid; each kind of broken input fails with
exit 1 and a ``file:line: what`` message, never a traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli.commands import main


def validate(repo: Path | str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["validate", "--repo", str(repo)])
    out, err = capsys.readouterr()
    return code, out + err


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_shipped_example_is_valid(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = validate(repo, capsys)
    assert code == 0, out
    assert "valid: 3 hosts (armitage, motoko, wintermute)" in out
    assert "valid: 3 hosts (armitage, motoko, wintermute), 0 warning(s)" in out
    # The seed's numbers (8192-token backends, 12,000-token rule) no longer contradict each
    # other: validate explains the effective limit of each local alias.
    assert re.search(
        r"hosts/armitage.yaml:\d+: note: 'local/chat' on armitage takes prompts up to 7168 tokens "
        r"\(max_model_len 8192 less routing.answer_reserve_tokens 1024\); longer prompts go to openai/strong",
        out,
    )
    assert "warning:" not in out


@pytest.mark.slow  # an external process (the CLI, git)
def test_cli_is_a_real_executable(repo: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "validate", "--repo", str(repo)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


CASES = {
    "yaml_syntax": (
        "hosts/armitage.yaml",
        "serves: [local/chat]",
        "serves: [local/chat",
        r"hosts/armitage.yaml:\d+: YAML syntax error",
    ),
    "unknown_key": (
        "hosts/armitage.yaml",
        "max_model_len: 8192",
        "max_model_lenght: 8192",
        r"hosts/armitage.yaml:8: unknown key 'max_model_lenght'",
    ),
    "unknown_top_key": (
        "fleet.yaml",
        "openai_cheap_model:",
        "openai_cheep_model:",
        r"fleet.yaml:7: unknown key 'openai_cheep_model'",
    ),
    "wrong_type": (
        "hosts/armitage.yaml",
        "max_model_len: 8192",
        "max_model_len: lots",
        r"hosts/armitage.yaml:8: 'vars.max_model_len': input should be a valid integer.*'lots'",
    ),
    "fallback_unknown_alias": (
        "fleet.yaml",
        "local/reasoner: [openai/strong]",
        "local/reasoner: [openai/strongest]",
        r"fleet.yaml:\d+: fallback from 'local/reasoner' to unknown alias 'openai/strongest'",
    ),
    "alias_served_by_nobody": (
        "hosts/wintermute.yaml",
        "serves: [local/reasoner]",
        "serves: []",
        r"alias 'local/reasoner' is served by no host",
    ),
    "alias_served_by_two": (
        "hosts/wintermute.yaml",
        "serves: [local/reasoner]",
        "serves: [local/reasoner, local/chat]",
        r"hosts/wintermute.yaml:\d+: alias 'local/chat' is served by two backends: armitage and wintermute",
    ),
    "missing_secret": (
        "hosts/motoko.yaml",
        "{secret: openai_api_key}",
        "{secret: openai_key}",
        r"hosts/motoko.yaml:7: secret 'openai_key' \(for 'openai_api_key'\) not found",
    ),
    "plaintext_secret": (
        "hosts/motoko.yaml",
        "{secret: openai_api_key}",
        "sk-plaintext",
        r"hosts/motoko.yaml:7: 'vars.openai_api_key': input should be a valid dictionary",
    ),
    "override_for_unknown_host": (
        "hosts/motoko.yaml",
        "embed_base_url:",
        "neuromancer_base_url: http://x/v1\n  embed_base_url:",
        r"hosts/motoko.yaml:\d+: unknown key 'neuromancer_base_url': no gpu_node host 'neuromancer'",
    ),
    "served_model_mismatch": (
        "hosts/motoko.yaml",
        "embed_base_url:",
        "wintermute_model_hf_id: google/gemma-2-9b-it-AWQ\n  embed_base_url:",
        r"hosts/motoko.yaml:\d+: wintermute_model_hf_id is 'google/gemma-2-9b-it-AWQ' but wintermute runs",
    ),
    "port_collision": (
        "hosts/armitage.yaml",
        "vllm_port: 8000",
        "vllm_port: 8000\n  extra_args: []\n  vllm_published_port: 8000",
        None,
    ),
    "compromised_litellm": (
        "hosts/motoko.yaml",
        "litellm_version: v1.108.7",
        "litellm_version: v1.107.0",
        r"1.107.0 was a compromised release",
    ),
    "unknown_key_on_the_gateway": (
        "hosts/motoko.yaml",
        "litellm_version: v1.108.7",
        "litellm_version: v1.108.7\n  litellm_workerz: 4",
        r"hosts/motoko.yaml:\d+: (vars: )?unknown key 'litellm_workerz'",
    ),
    "duplicate_key": (
        "hosts/armitage.yaml",
        "vllm_port: 8000",
        "vllm_port: 8000\n  vllm_port: 8001",
        r"hosts/armitage.yaml:\d+: duplicate key 'vllm_port'",
    ),
}


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c[3]])
def test_broken_input_fails_with_location(name: str, repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rel, old, new, expected = CASES[name]
    edit(repo / rel, old, new)
    code, out = validate(repo, capsys)
    assert code == 1, out
    assert expected is not None and re.search(expected, out), out
    assert "Traceback" not in out


def test_port_collision_on_one_host(repo: Path, roles_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A role that publishes the same port twice on one host.
    edit(
        roles_copy / "motoko/templates/compose.yaml.j2",
        "    restart: unless-stopped\n\nvolumes:",
        '    ports:\n      - "{{ litellm_port }}:6379"\n    restart: unless-stopped\n\nvolumes:',
    )
    code, out = validate(repo, capsys)
    assert code == 1
    assert "hosts/motoko.yaml: port 8000/tcp is published twice on host 'motoko'" in out


def test_a_drained_service_the_stack_lacks(repo: Path, roles_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit(roles_copy / "gpu_node/role.yaml", "drain: [vllm]", "drain: [vlm]")
    code, out = validate(repo, capsys)
    assert code == 1
    assert "roles/gpu_node/role.yaml: drain: service 'vlm' is not in the role's stack (vllm)" in out, out


def test_template_undefined_variable(repo: Path, roles_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit(roles_copy / "gpu_node/templates/compose.yaml.j2", "{{ model_hf_id | tojson }}", "{{ model_id | tojson }}")
    code, out = validate(repo, capsys)
    assert code == 1
    assert re.search(r"roles/gpu_node/templates/compose.yaml.j2:8: template error: 'model_id' is undefined", out), out
    assert ">    8 |       - {{ model_id | tojson }}" in out  # the offending line, with context
    assert "Traceback" not in out


def test_template_syntax_error(repo: Path, roles_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit(roles_copy / "motoko/templates/litellm.env.j2", "{{ openai_api_key }}", "{{ openai_api_key }")
    code, out = validate(repo, capsys)
    assert code == 1
    assert re.search(r"roles/motoko/templates/litellm.env.j2:3: template syntax error", out), out


def test_unsupported_compose_key_is_an_error(repo: Path, roles_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit(roles_copy / "gpu_node/templates/compose.yaml.j2", "    ipc: host", "    ipc: host\n    privileged: true")
    code, out = validate(repo, capsys)
    assert code == 1
    assert "unknown key 'privileged' in 'services.vllm'" in out


def test_allowed_fails_is_refused(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit(
        repo / "hosts/motoko.yaml",
        "embed_base_url:",
        "litellm_router_settings_extra: {allowed_fails: 3}\n  embed_base_url:",
    )
    code, out = validate(repo, capsys)
    assert code == 1
    assert "allowed_fails must not be set" in out


def test_every_problem_is_reported_at_once(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit(repo / "hosts/armitage.yaml", "max_model_len: 8192", "max_model_lenght: 8192")
    edit(repo / "fleet.yaml", "openai_cheap_model:", "openai_cheep_model:")
    code, out = validate(repo, capsys)
    assert code == 1
    assert "max_model_lenght" in out and "openai_cheep_model" in out


def test_missing_repo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = validate(tmp_path / "nope", capsys)
    assert code == 1 and "desired-state directory not found" in out


@pytest.mark.slow  # an external process (the CLI, git)
def test_validate_a_git_url(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    bare = tmp_path / "remote.git"

    def git(*args: str) -> None:
        subprocess.run(
            ["git", "-c", "user.name=op", "-c", "user.email=op@x", *args], cwd=repo, check=True, capture_output=True
        )

    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    git("init", "-q", "-b", "main")
    git("add", "-A")
    git("commit", "-q", "-m", "fleet")
    git("push", "-q", str(bare), "HEAD:main")
    code, out = validate(bare.as_uri(), capsys)
    assert code == 0, out
    edit(repo / "fleet.yaml", "openai_cheap_model:", "openai_cheep_model:")
    git("commit", "-q", "-am", "typo")
    git("push", "-q", str(bare), "HEAD:main")
    code, out = validate(bare.as_uri(), capsys)
    assert code == 1 and "fleet.yaml:7: unknown key 'openai_cheep_model'" in out
