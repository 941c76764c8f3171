"""``agent render``: the motoko stack carries the seed's routing; the GPU hosts carry the seed's
vLLM launch; secrets appear only in the 0600 files (the env file, the proxy config with the
master key), and only when revealed."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.adapters.secrets import SecretResolver
from agent.cli.commands import main
from agent.core.errors import DesiredStateError
from agent.desired.load import load_desired
from agent.desired.render import render_host
from tests.conftest import DEMO_IDENTITY, ROOT
from tests.test_validate import edit

SECRET_VALUES = ("sk-demo-not-a-real-key", "mkt-demo-bearer-token-change-me")


def render(repo: Path, host: str, out: Path, *extra: str) -> dict[str, str]:
    assert main(["render", "--host", host, "--repo", str(repo), "--out", str(out), *extra]) == 0
    return {str(p.relative_to(out)): p.read_text() for p in out.rglob("*") if p.is_file()}


def test_motoko_litellm_config(repo: Path, tmp_path: Path) -> None:
    files = render(repo, "motoko", tmp_path / "out")
    assert set(files) == {
        "compose.yaml",
        "config/config.yaml",
        "config/fleet_auth.py",
        "config/sitecustomize.py",
        "litellm.env",
        "haproxy/haproxy.cfg",
    }
    cfg: dict[str, Any] = yaml.safe_load(files["config/config.yaml"])
    groups: dict[str, list[dict[str, Any]]] = {}
    for m in cfg["model_list"]:
        groups.setdefault(m["model_name"], []).append(m)
    assert set(groups) == {"local/chat", "local/reasoner", "local/embed", "openai/strong", "openai/cheap"}
    # Each alias is one model group: its fallback chain as ordered deployments.
    chat = groups["local/chat"]
    assert [(m["litellm_params"]["order"], m["model_info"]["id"]) for m in chat] == [
        (1, "local/chat@armitage"),
        (2, "local/chat@wintermute"),
        (3, "local/chat@openai-strong"),
    ]
    models = {name: group[0] for name, group in groups.items()}
    assert models["local/chat"]["litellm_params"]["model"] == "hosted_vllm/Qwen/Qwen2.5-7B-Instruct-AWQ"
    assert models["local/chat"]["litellm_params"]["api_base"] == "http://armitage:8000/v1"
    assert (
        models["local/reasoner"]["litellm_params"]["model"] == "hosted_vllm/meta-llama/Meta-Llama-3.1-8B-Instruct-AWQ"
    )
    assert models["local/reasoner"]["litellm_params"]["api_base"] == "http://wintermute:8000/v1"
    assert models["local/embed"]["litellm_params"]["api_base"] == "http://motoko:8200/v1"
    assert [m["model_info"]["id"] for m in groups["local/embed"]] == ["local/embed@motoko-embed"]
    assert models["openai/strong"]["litellm_params"]["model"] == "openai/gpt-4.1-mini"
    assert models["openai/cheap"]["litellm_params"]["model"] == "openai/gpt-4o-mini"
    assert models["openai/strong"]["model_info"]["disable_background_health_check"] is True
    assert chat[2]["model_info"]["disable_background_health_check"] is True
    # One context rule: max_model_len 8192 less the 1024-token answer reserve, capped at 12,000.
    assert models["local/chat"]["model_info"]["max_input_tokens"] == 8192 - 1024
    router = cfg["router_settings"]
    assert {"local/reasoner": ["local/chat"]} in router["fallbacks"]
    assert {"openai/strong": ["local/chat"]} in router["fallbacks"]
    assert {"local/chat": ["openai/strong"]} in router["context_window_fallbacks"]
    assert router["enable_pre_call_checks"] is True
    assert router["num_retries"] == 0
    assert "allowed_fails" not in router
    assert router["provider_budget_config"] == {"openai": {"budget_limit": 150.0, "time_period": "1mo"}}
    assert cfg["general_settings"]["master_key"] == "**REDACTED**"  # the key itself: in the file, not the env
    # The keys accepted, through the role's auth module next to the config (digests; redacted here).
    assert cfg["general_settings"]["custom_auth"] == "fleet_auth.user_api_key_auth"
    assert cfg["general_settings"]["llm_agent_accepted_key_sha256"] == ["**REDACTED**"]
    assert files["config/fleet_auth.py"] == (ROOT / "roles/motoko/templates/fleet_auth.py").read_text()
    assert files["config/sitecustomize.py"] == (ROOT / "roles/motoko/templates/sitecustomize.py").read_text()
    env = files["litellm.env"]
    assert "LITELLM_MASTER_KEY" not in env
    assert "LITELLM_LOCAL_MODEL_COST_MAP=True" in env
    assert "GRACEFUL_SHUTDOWN_TIMEOUT=150" in env  # routing.timeout_s (120) + 30
    compose = yaml.safe_load(files["compose.yaml"])
    assert compose["services"]["litellm"]["container_name"] == "litellm"
    # The front proxy holds the public port; LiteLLM publishes none (it is replaced
    # start-before-stop behind it) and gets the time to finish its answers when it stops.
    assert "ports" not in compose["services"]["litellm"]
    assert compose["services"]["litellm"]["stop_grace_period"] == "160s"  # GRACEFUL_SHUTDOWN_TIMEOUT + 10
    front = compose["services"]["haproxy"]
    assert front["ports"] == ["0.0.0.0:8000:4000"]
    assert front["image"].startswith("haproxy:")
    assert front["volumes"] == ["./haproxy:/usr/local/etc/haproxy:ro"]
    haproxy = files["haproxy/haproxy.cfg"]
    assert "server-template litellm 4 litellm:4000 check\n" in haproxy
    assert "retry-on conn-failure empty-response" in haproxy
    assert "response-timeout" not in haproxy.split("retry-on", 1)[1].splitlines()[0]  # no retry of a slow answer
    # fallback chain local/chat -> reasoner -> openai/strong: 3 x routing.timeout_s (120) + 30
    assert "timeout server 390s" in haproxy and "timeout client 390s" in haproxy
    assert not any(v in haproxy for v in SECRET_VALUES)
    assert "--run_gunicorn" in compose["services"]["litellm"]["command"]
    assert compose["services"]["redis"]["image"].startswith("redis:")


def test_secrets_redacted_unless_revealed(repo: Path, tmp_path: Path) -> None:
    files = render(repo, "motoko", tmp_path / "redacted")
    for text in files.values():
        for value in SECRET_VALUES:
            assert value not in text
    assert "OPENAI_API_KEY=**REDACTED**" in files["litellm.env"]
    assert yaml.safe_load(files["config/config.yaml"])["general_settings"]["master_key"] == "**REDACTED**"

    out = tmp_path / "revealed"
    files = render(repo, "motoko", out, "--reveal-secrets")
    assert "OPENAI_API_KEY=sk-demo-not-a-real-key" in files["litellm.env"]
    cfg = yaml.safe_load(files["config/config.yaml"])
    assert cfg["general_settings"]["master_key"] == "mkt-demo-bearer-token-change-me"
    for secret in ("litellm.env", "config/config.yaml"):
        assert stat.S_IMODE((out / secret).stat().st_mode) == 0o600, secret
    assert "mkt-demo-bearer-token-change-me" not in files["litellm.env"]
    for name, text in files.items():
        if name not in ("litellm.env", "config/config.yaml"):
            assert not any(v in text for v in SECRET_VALUES), name


def test_secret_from_environment_wins(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_SECRET_LITELLM_BEARER_TOKEN", "mkt-from-env")
    files = render(repo, "motoko", tmp_path / "o", "--reveal-secrets")
    assert yaml.safe_load(files["config/config.yaml"])["general_settings"]["master_key"] == "mkt-from-env"


@pytest.mark.parametrize(
    "use",
    [
        "{{ openai_api_key }}",
        "{{ openai_api_key | upper }}",
        "{{ openai_api_key | reverse }}",
        "{{ openai_api_key | string | list | join }}",
        "{{ (openai_api_key ~ '')[0:12] }}",
        "{{ litellm_config | with_master_key(openai_api_key) | to_yaml | replace('\\n', ' ') }}",
    ],
)
def test_a_secret_outside_the_secret_file_is_refused_even_transformed(repo: Path, roles_copy: Path, use: str) -> None:
    """Secrets go only where role.yaml says (the 0600 files): any use elsewhere, through any
    filter, is an error, redacted or revealed; a transformed value would pass an exact-value check."""
    edit(
        roles_copy / "motoko/templates/compose.yaml.j2",
        "services:",
        f"# key {use}\nservices:",
    )
    desired = load_desired(repo)
    resolver = SecretResolver.for_repo(repo, identity=DEMO_IDENTITY)
    for reveal in (False, True):
        with pytest.raises(DesiredStateError) as err:
            render_host(desired, "motoko", resolver, reveal=reveal)
        assert "compose.yaml.j2:3" in str(err.value)
        if "with_master_key" in use:
            assert "used outside the role's secret files" in str(err.value)
        for value in resolver.known_values():
            for shown in (value, value.upper(), value[::-1], value[:12]):
                assert shown not in str(err.value)


def test_a_template_error_never_quotes_a_revealed_secret(repo: Path, roles_copy: Path) -> None:
    edit(roles_copy / "motoko/templates/litellm.env.j2", "{{ openai_api_key }}", "{{ fleet[openai_api_key ~ ''] }}")
    desired = load_desired(repo)
    resolver = SecretResolver.for_repo(repo, identity=DEMO_IDENTITY)
    with pytest.raises(DesiredStateError) as err:
        render_host(desired, "motoko", resolver, reveal=True)
    value = resolver.value("openai_api_key")
    assert value not in str(err.value) and "**REDACTED**" in str(err.value)


def test_undecryptable_secret_is_a_clear_error(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AGENT_IDENTITY_FILE", str(tmp_path / "missing-identity.txt"))
    code = main(["render", "--host", "motoko", "--repo", str(repo), "--out", str(tmp_path / "o"), "--reveal-secrets"])
    err = capsys.readouterr().err
    assert code == 1
    assert "cannot be decrypted: no identity file" in err
    assert not any(v in err for v in SECRET_VALUES)


SEED_ARGS = [
    "--quantization",
    "awq",
    "--max-model-len",
    "8192",
    "--gpu-memory-utilization",
    "0.90",
    "--host",
    "0.0.0.0",
    "--port",
    "8000",
]


@pytest.mark.parametrize(
    ("host", "model"),
    [("armitage", "Qwen/Qwen2.5-7B-Instruct-AWQ"), ("wintermute", "meta-llama/Meta-Llama-3.1-8B-Instruct-AWQ")],
)
def test_gpu_nodes_launch_vllm_like_the_seed(repo: Path, tmp_path: Path, host: str, model: str) -> None:
    compose = yaml.safe_load(render(repo, host, tmp_path / host)["compose.yaml"])
    vllm = compose["services"]["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    cmd = vllm["command"]
    assert cmd[cmd.index("--model") + 1] == model
    for flag, value in zip(SEED_ARGS[::2], SEED_ARGS[1::2], strict=True):
        assert cmd[cmd.index(flag) + 1] == value, flag
    assert vllm["ipc"] == "host"
    assert vllm["ulimits"]["memlock"] == -1
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert vllm["healthcheck"]["start_period"] == "900s"
    assert vllm["restart"] == "unless-stopped"


def test_gemma_switch_is_one_line(repo: Path, tmp_path: Path) -> None:
    edit(repo / "hosts/wintermute.yaml", "  model_hf_id: meta-llama/Meta-Llama-3.1-8B-Instruct-AWQ\n", "")
    edit(
        repo / "hosts/wintermute.yaml",
        "# model_hf_id: google/gemma-2-9b-it-AWQ",
        "model_hf_id: google/gemma-2-9b-it-AWQ",
    )
    cmd = yaml.safe_load(render(repo, "wintermute", tmp_path / "w")["compose.yaml"])["services"]["vllm"]["command"]
    assert cmd[cmd.index("--model") + 1] == "google/gemma-2-9b-it-AWQ"
    cfg = yaml.safe_load(render(repo, "motoko", tmp_path / "m")["config/config.yaml"])
    reasoner = next(m for m in cfg["model_list"] if m["model_name"] == "local/reasoner")
    assert reasoner["litellm_params"]["model"] == "hosted_vllm/google/gemma-2-9b-it-AWQ"


def test_cpu_only_host_requests_no_gpu(repo: Path) -> None:
    edit(repo / "hosts/armitage.yaml", "vllm_port: 8000", "vllm_port: 8000\n  gpu_count: 0")
    stack = render_host(load_desired(repo), "armitage", SecretResolver.for_repo(repo, identity=DEMO_IDENTITY)).stack
    assert stack.services["vllm"].gpus is None
    stack = render_host(load_desired(repo), "wintermute", SecretResolver.for_repo(repo, identity=DEMO_IDENTITY)).stack
    assert stack.services["vllm"].gpus is not None and stack.services["vllm"].gpus.count == -1


def test_seed_base_url_override(repo: Path, tmp_path: Path) -> None:
    edit(
        repo / "hosts/motoko.yaml", "embed_base_url:", 'armitage_base_url: "http://armitage:8001/v1"\n  embed_base_url:'
    )
    cfg = yaml.safe_load(render(repo, "motoko", tmp_path / "m")["config/config.yaml"])
    chat = next(m for m in cfg["model_list"] if m["model_name"] == "local/chat")
    assert chat["litellm_params"]["api_base"] == "http://armitage:8001/v1"


def test_prefix_and_ports_let_hosts_share_one_engine(repo: Path) -> None:
    stack = render_host(
        load_desired(repo), "motoko", SecretResolver.for_repo(repo, identity=DEMO_IDENTITY), prefix="t1-"
    ).stack
    assert stack.project == "t1-motoko"
    assert stack.services["litellm"].container_name == "t1-litellm"


def test_unknown_host(repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "--host", "neuromancer", "--repo", str(repo), "--out", str(tmp_path)]) == 1
    assert "no such host 'neuromancer' (hosts: armitage, motoko, wintermute)" in capsys.readouterr().err


def test_seed_gemma_values_on_the_gateway_are_accepted(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The seed's own switch: model_hf_id on wintermute, display/hf_id kept on motoko."""
    edit(repo / "hosts/wintermute.yaml", "  model_hf_id: meta-llama/Meta-Llama-3.1-8B-Instruct-AWQ\n", "")
    edit(
        repo / "hosts/wintermute.yaml",
        "# model_hf_id: google/gemma-2-9b-it-AWQ",
        "model_hf_id: google/gemma-2-9b-it-AWQ",
    )
    edit(
        repo / "hosts/motoko.yaml",
        "embed_base_url:",
        'wintermute_model_display: "openai/gemma-2-9b-it-awq"\n'
        '  wintermute_model_hf_id: "google/gemma-2-9b-it-AWQ"\n  embed_base_url:',
    )
    assert main(["validate", "--repo", str(repo)]) == 0
    out = capsys.readouterr().out
    assert "wintermute_model_display uses the 'openai/' provider" in out  # a warning, with the reason
    cfg = yaml.safe_load(render(repo, "motoko", tmp_path / "m")["config/config.yaml"])
    reasoner = next(m for m in cfg["model_list"] if m["model_name"] == "local/reasoner")
    assert reasoner["litellm_params"]["model"] == "hosted_vllm/google/gemma-2-9b-it-AWQ"
