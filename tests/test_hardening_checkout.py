"""One-off commands read a git working tree as it is on disk (the edit the operator is looking
at), not the committed head of some branch; URLs and bare repositories are still fetched."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.cli.commands import main


def git(cwd: Path, *args: str) -> str:
    env_args = ["-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "commit.gpgsign=false"]
    out = subprocess.run(["git", *env_args, *args], cwd=cwd, check=True, capture_output=True, text=True)
    return out.stdout.strip()


@pytest.fixture
def checkout(repo: Path) -> Path:
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "valid desired state")
    return repo


def test_validate_reads_the_uncommitted_edit(checkout: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host = checkout / "hosts" / "armitage.yaml"
    host.write_text(host.read_text() + "\nnot_a_key: 1\n")
    assert main(["validate", "--repo", str(checkout)]) == 1
    out, err = capsys.readouterr()
    assert "armitage.yaml" in out and "not_a_key" in out, out + err


def test_a_detached_checkout_validates(checkout: Path, capsys: pytest.CaptureFixture[str]) -> None:
    git(checkout, "checkout", "-q", "--detach", "HEAD")
    git(checkout, "branch", "-q", "-D", "main")  # e.g. a CI checkout of a commit: no branch at all
    assert main(["validate", "--repo", str(checkout)]) == 0, capsys.readouterr()
    assert "valid:" in capsys.readouterr().out


def test_a_bare_repository_is_still_fetched(checkout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bare = tmp_path / "fleet.git"
    git(tmp_path, "clone", "-q", "--bare", str(checkout), str(bare))
    host = checkout / "hosts" / "armitage.yaml"
    host.write_text(host.read_text() + "\nnot_a_key: 1\n")  # not committed: not in the bare repo
    assert main(["validate", "--repo", str(bare)]) == 0, capsys.readouterr()


def test_render_names_the_dirty_commit(checkout: Path, tmp_path: Path) -> None:
    from agent.cli.commands import _checkout
    from agent.node.settings import Settings

    (checkout / "fleet.yaml").write_text((checkout / "fleet.yaml").read_text() + "\n# an edit\n")
    head = git(checkout, "rev-parse", "HEAD")[:12]
    with _checkout(Settings(repo=str(checkout), host="armitage")) as (path, commit):
        assert path == checkout and commit == f"{head}+dirty"
