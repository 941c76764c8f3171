"""Settings (TOML + AGENT_* overrides), operator secret commands, status exit codes."""

from __future__ import annotations

import io
import stat
from pathlib import Path

import pytest

from agent.adapters.secrets import AgeSecrets
from agent.cli.commands import main
from agent.core.errors import ConfigError, SecretError
from agent.daemon.status import exit_code
from agent.node.settings import load_settings


def test_toml_then_environment_then_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('host = "wintermute"\nrepo = "ssh://git@forge/fleet.git"\ninterval = 60\nproject_prefix = "p-"\n')
    s = load_settings(cfg, environ={"AGENT_INTERVAL": "15"})
    assert (s.host, s.repo, s.interval, s.project_prefix) == ("wintermute", "ssh://git@forge/fleet.git", 15.0, "p-")
    assert load_settings(cfg, environ={}, host="armitage").host == "armitage"
    assert s.socket_path == Path("/var/lib/llm-agent/agent.sock")


def test_config_flag_after_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """agent.service runs `agent run --config FILE`."""
    assert main(["run", "--config", str(tmp_path / "missing.toml")]) == 1
    assert "configuration file not found" in capsys.readouterr().err
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{tmp_path}"\n')
    assert main(["status", "--config", str(cfg)]) == 3  # read from that file: nothing runs there


def test_bad_settings_are_clear_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('hots = "typo"\n')
    with pytest.raises(ConfigError, match="hots"):
        load_settings(cfg, environ={})
    cfg.write_text("interval = [\n")
    with pytest.raises(ConfigError, match=r"agent\.toml"):
        load_settings(cfg, environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml", environ={})
    with pytest.raises(ConfigError, match="interval"):
        load_settings(None, environ={"AGENT_CONFIG": str(tmp_path / "nope.toml"), "AGENT_INTERVAL": "soon"})


def test_keygen_then_encrypt_then_the_host_decrypts(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    identity = tmp_path / "etc" / "identity.txt"
    assert main(["keygen", "--out", str(identity)]) == 0
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600
    recipient = capsys.readouterr().out.split("public key (add it to secrets/recipients.txt): ")[1].strip()
    assert recipient.startswith("age1")
    assert main(["keygen", "--out", str(identity)]) == 1  # never overwrites an identity
    (repo / "secrets" / "recipients.txt").write_text(f"{recipient}\n")
    # Token rotation is a commit: encrypt the new value, push.
    monkeypatch.setattr("sys.stdin", io.StringIO("mkt-rotated-token\n"))
    assert main(["secret", "encrypt", "litellm_bearer_token", "--repo", str(repo)]) == 0
    assert AgeSecrets(repo / "secrets", identity).get("litellm_bearer_token") == "mkt-rotated-token"
    # The old (demo) identity can no longer read it: a clear error, no value.
    with pytest.raises(SecretError, match="cannot be decrypted with"):
        AgeSecrets(repo / "secrets", Path(__file__).parent.parent / "examples" / "demo-identity.txt").get(
            "litellm_bearer_token"
        )


def test_secret_encrypt_refuses_bad_input(
    repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["secret", "encrypt", "token", "--repo", str(repo)]) == 1
    monkeypatch.setattr("sys.stdin", io.StringIO("x"))
    assert main(["secret", "encrypt", "Bad-Name", "--repo", str(repo)]) == 1
    (repo / "secrets" / "recipients.txt").write_text("not-a-key\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("x"))
    assert main(["secret", "encrypt", "token", "--repo", str(repo)]) == 1
    assert "not an age public key" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("status", "code"),
    [
        ({"running": False}, 3),
        (
            {
                "running": True,
                "last_run": {"result": "converged"},
                "services": [{"name": "vllm", "state": "running", "health": "healthy"}],
            },
            0,
        ),
        ({"running": True, "last_run": {"result": "failed", "error": "x"}}, 1),
        ({"running": True, "last_run": {"result": "converged"}, "paused": {"reason": "r"}}, 1),
        ({"running": True, "last_run": {"result": "converged"}, "services": [{"name": "vllm", "state": "exited"}]}, 1),
        ({"running": True, "last_run": {"result": "converged"}, "source": {"error": "unreachable"}}, 1),
        (
            {
                "running": True,
                "last_run": {"result": "converged"},
                "services": [{"name": "vllm", "state": "running", "health": "unhealthy"}],
            },
            1,
        ),
    ],
)
def test_status_exit_codes(status: dict[str, object], code: int) -> None:
    assert exit_code(status) == code


def test_status_when_not_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--state-dir", str(tmp_path)]) == 3
    assert "not running" in capsys.readouterr().out.lower()
    assert main(["trigger", "--state-dir", str(tmp_path)]) == 1
    assert "agent not running" in capsys.readouterr().err
