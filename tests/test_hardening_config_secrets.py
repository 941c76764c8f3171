"""Bad agent.toml, identity and recipients files are one clear line, never a traceback."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from agent.adapters.secrets import AgeSecrets, keygen, load_identity
from agent.cli.commands import main
from agent.core.errors import ConfigError, SecretError
from agent.node.settings import load_settings
from tests.conftest import one_line_error

MALFORMED_IDENTITY = "# a host identity, damaged\nAGE-SECRET-KEY-1NOTAREALKEY\n"


def test_non_utf8_config_names_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_bytes(b'host = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"agent\.toml: not UTF-8"):
        load_settings(cfg, environ={})


def test_non_utf8_config_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_bytes(b"\xff\xfe\x00")
    assert main(["status", "--config", str(cfg)]) == 1
    assert str(cfg) in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("level", ["debug", "INFO", "Warning", "error"])
def test_log_levels_accepted_case_insensitive(tmp_path: Path, level: str) -> None:
    environ = {"AGENT_CONFIG": str(tmp_path / "absent.toml"), "AGENT_LOG_LEVEL": level}
    assert load_settings(environ=environ).log_level == level.lower()


def test_unknown_log_level_lists_the_allowed_ones(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('log_level = "verbose"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    message = str(info.value)
    assert "log_level" in message and "verbose" in message
    for level in ("debug", "info", "warning", "error"):
        assert level in message


def test_malformed_identity_is_a_secret_error(tmp_path: Path) -> None:
    identity = tmp_path / "identity.txt"
    identity.write_text(MALFORMED_IDENTITY)
    with pytest.raises(SecretError, match=r"identity\.txt: not a valid age identity"):
        load_identity(identity)


def test_malformed_identity_when_decrypting(tmp_path: Path, repo: Path) -> None:
    identity = tmp_path / "identity.txt"
    identity.write_text(MALFORMED_IDENTITY)
    with pytest.raises(SecretError, match="not a valid age identity"):
        AgeSecrets(repo / "secrets", identity).get("litellm_bearer_token")


def test_non_utf8_identity_is_a_secret_error(tmp_path: Path) -> None:
    identity = tmp_path / "identity.txt"
    identity.write_bytes(b"AGE-SECRET-KEY-\xff\n")
    with pytest.raises(SecretError, match=r"identity\.txt"):
        load_identity(identity)


def test_validate_reports_a_malformed_identity(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    identity = tmp_path / "identity.txt"
    identity.write_text(MALFORMED_IDENTITY)
    monkeypatch.setenv("AGENT_IDENTITY_FILE", str(identity))
    assert main(["validate", "--repo", str(repo)]) == 1
    out, err = capsys.readouterr()
    assert "not a valid age identity" in out
    assert "invalid: 1 error(s)" in err
    assert "valid:" not in out


def test_validate_json_reports_a_malformed_identity(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    identity = tmp_path / "identity.txt"
    identity.write_text(MALFORMED_IDENTITY)
    monkeypatch.setenv("AGENT_IDENTITY_FILE", str(identity))
    assert main(["validate", "--repo", str(repo), "--json"]) == 1
    assert '"valid": false' in capsys.readouterr().out


def test_validate_without_an_identity_file_is_still_valid(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # validate never decrypts: a machine without the host key can still check a commit.
    monkeypatch.setenv("AGENT_IDENTITY_FILE", str(tmp_path / "absent.txt"))
    assert main(["validate", "--repo", str(repo)]) == 0
    assert "valid:" in capsys.readouterr().out


def test_keygen_where_the_parent_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "etc"
    blocker.write_text("not a directory")
    target = blocker / "llm-agent" / "identity.txt"
    with pytest.raises(SecretError, match="cannot write"):
        keygen(target)
    assert main(["keygen", "--out", str(target)]) == 1
    assert str(target) in one_line_error(capsys.readouterr().err)


def test_keygen_where_the_directory_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["keygen", "--out", str(blocker / "identity.txt")]) == 1
    one_line_error(capsys.readouterr().err)


def test_non_utf8_recipients_file(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    recipients = tmp_path / "recipients.txt"
    recipients.write_bytes(b"age1\xff\xfe\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("a-token-value\n"))
    assert main(["secret", "encrypt", "token", "--repo", str(repo), "--recipients", str(recipients)]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert str(recipients) in line and "UTF-8" in line
