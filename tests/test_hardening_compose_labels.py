"""``docker compose ls`` shows our stacks' config files, and ``docker compose ps`` does not warn:
containers carry the config_files label, and the file it names is the rendered compose file."""

from __future__ import annotations

from pathlib import Path

from agent.adapters.secrets import SecretResolver
from agent.core import labels as L
from agent.core.outcomes import PassOutcome
from agent.desired.load import load_desired
from agent.desired.render import render_host
from agent.node.reconcile import reconcile_once
from agent.testing.fakes import FakeEngine
from tests.conftest import fake_settings


def test_containers_name_the_rendered_compose_file(tmp_path: Path, repo: Path) -> None:
    settings = fake_settings("armitage", tmp_path, repo)
    engine = FakeEngine(any_image=True)
    result = reconcile_once(settings, engine)
    assert result.result is PassOutcome.CONVERGED, result.error
    stack_dir = settings.state_dir / "stacks" / "armitage"
    compose = stack_dir / "compose.yaml"
    assert engine.containers
    for c in engine.containers.values():
        assert c.labels[L.CONFIG_FILES] == str(compose)
        assert c.labels[L.WORKING_DIR] == str(stack_dir)
    resolver = SecretResolver.for_repo(repo, settings.secrets_file, settings.identity_file)
    rendered = render_host(load_desired(repo), "armitage", resolver, reveal=True)
    assert compose.read_text() == rendered.compose
    assert compose.stat().st_mode & 0o077 == 0
