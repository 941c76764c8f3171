"""Silent divergence: the stack files on disk are part of what runs. A deleted or edited
config file, or a state directory pointed elsewhere, is found by the next pass (``plan`` says
so, exit 2), rewritten, and the services that mount it get the role's action."""

from __future__ import annotations

from pathlib import Path

from agent.core import labels as L
from agent.core.outcomes import ActionKind, PassOutcome
from agent.node.reconcile import PassOptions, PassResult, reconcile_once
from agent.node.settings import Settings
from agent.testing.fakes import FakeClock, FakeEngine
from tests.conftest import DEMO_IDENTITY


def settings(tmp_path: Path, repo: Path, state: str = "state") -> Settings:
    return Settings(
        host="motoko",
        repo=str(repo),
        state_dir=tmp_path / state,
        identity_file=DEMO_IDENTITY,
        secrets_file=tmp_path / "none.yaml",
        health_timeout=30,
    )


def apply(s: Settings, engine: FakeEngine, dry_run: bool = False) -> PassResult:
    options = PassOptions(dry_run=dry_run)
    return reconcile_once(s, engine, commit="a" * 40, options=options, clock=FakeClock())


def converged(s: Settings, engine: FakeEngine) -> Path:
    first = apply(s, engine)
    assert first.result is PassOutcome.CONVERGED, first.error
    again = apply(s, engine, dry_run=True)
    assert again.result is PassOutcome.CONVERGED, [str(a) for a in again.actions]
    return s.state_dir / "stacks" / first.project


def kinds(result: PassResult) -> dict[tuple[str, str], str]:
    return {(str(a.kind), a.target): a.reason for a in result.actions if a.kind is not ActionKind.NOOP}


def test_a_deleted_config_is_reported_rewritten_and_the_proxy_restarted(tmp_path: Path, repo: Path) -> None:
    s, engine = settings(tmp_path, repo), FakeEngine(any_image=True)
    stack = converged(s, engine)
    config = stack / "config" / "config.yaml"
    desired = config.read_text()
    config.unlink()

    dry = apply(s, engine, dry_run=True)  # `agent plan`: exit 2
    assert dry.result is PassOutcome.PENDING
    todo = kinds(dry)
    assert "config/config.yaml on disk differs from the desired state" in todo[("write_file", "config/config.yaml")]
    assert "deleted" in todo[("restart", "litellm")]
    assert not config.exists(), "a dry run writes nothing"

    restarts = len(engine.ops("restart"))
    fixed = apply(s, engine)
    assert fixed.result is PassOutcome.CONVERGED, fixed.error
    assert config.read_text() == desired
    assert len(engine.ops("restart")) == restarts + 1
    assert apply(s, engine, dry_run=True).result is PassOutcome.CONVERGED


def test_an_edited_config_is_rewritten_and_reloaded_by_the_role_policy(tmp_path: Path, repo: Path) -> None:
    s, engine = settings(tmp_path, repo), FakeEngine(any_image=True)
    stack = converged(s, engine)
    config = stack / "config" / "config.yaml"
    desired = config.read_text()
    config.write_text(desired + "# edited by hand\n")

    todo = kinds(apply(s, engine, dry_run=True))
    assert "edited" in todo[("write_file", "config/config.yaml")]
    assert "reload with SIGTTIN" in todo[("reload", "litellm")]

    fixed = apply(s, engine)
    assert fixed.result is PassOutcome.CONVERGED, fixed.error
    assert config.read_text() == desired
    assert engine.ops("signal"), "reloaded in place"


def test_a_changed_mode_or_an_unmounted_file_is_rewritten_too(tmp_path: Path, repo: Path) -> None:
    s, engine = settings(tmp_path, repo), FakeEngine(any_image=True)
    stack = converged(s, engine)
    env = stack / "litellm.env"
    env.chmod(0o644)  # a secret file made world-readable

    todo = kinds(apply(s, engine, dry_run=True))
    assert list(todo) == [("write_file", "litellm.env")], "not mounted: no service is touched"
    fixed = apply(s, engine)
    assert fixed.result is PassOutcome.CONVERGED, fixed.error
    assert env.stat().st_mode & 0o777 == 0o600


def test_a_new_state_dir_recreates_the_services_that_mount_stack_files(tmp_path: Path, repo: Path) -> None:
    engine = FakeEngine(any_image=True)
    old = converged(settings(tmp_path, repo), engine)
    s = settings(tmp_path, repo, state="elsewhere")

    todo = kinds(apply(s, engine, dry_run=True))
    assert ("write_file", "config/config.yaml") in todo
    assert f"mounts its files from {old}" in todo[("recreate", "litellm")]
    assert not any(target == "redis" for _, target in todo), "redis mounts no stack file"

    fixed = apply(s, engine)
    assert fixed.result is PassOutcome.CONVERGED, fixed.error
    new = s.state_dir / "stacks" / fixed.project
    assert (new / "config" / "config.yaml").is_file()
    [litellm] = [c for c in engine.containers.values() if c.labels.get(L.SERVICE) == "litellm"]
    assert litellm.labels[L.WORKING_DIR] == str(new)
    assert apply(s, engine, dry_run=True).result is PassOutcome.CONVERGED


def test_an_unreadable_config_is_said_so_and_rewritten(tmp_path: Path, repo: Path) -> None:
    s, engine = settings(tmp_path, repo), FakeEngine(any_image=True)
    stack = converged(s, engine)
    config = stack / "config" / "config.yaml"
    desired = config.read_text()
    config.write_bytes(b"\xff\xfe not text")

    todo = kinds(apply(s, engine, dry_run=True))
    assert todo[("write_file", "config/config.yaml")].endswith("(unreadable)")
    assert "restarted so the container mounts it afresh" in todo[("restart", "litellm")]
    fixed = apply(s, engine)
    assert fixed.result is PassOutcome.CONVERGED, fixed.error
    assert config.read_text() == desired
