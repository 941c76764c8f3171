"""The generated LiteLLM config is resilient by itself (pure, fast): ordered model groups,
per-deployment cooldown policy, health-check routing, separate timeouts, one context rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.core.model import Fleet, RoutingPolicy
from agent.core.routing import Backend, Health, decide, graceful_shutdown_s, litellm_config


def table(armitage_len: int = 8192, wintermute_len: int = 8192) -> list[Backend]:
    return [
        Backend("armitage", "local/chat", "vllm", "hosted_vllm/q", "http://armitage:8000/v1", "armitage", armitage_len),
        Backend(
            "wintermute",
            "local/reasoner",
            "vllm",
            "hosted_vllm/l",
            "http://wintermute:8000/v1",
            "wintermute",
            wintermute_len,
        ),
        Backend("motoko-embed", "local/embed", "embedding", "hosted_vllm/bge", "http://motoko:8200/v1", None, 512),
        Backend("openai-strong", "openai/strong", "openai", "openai/gpt-4.1-mini", None, None),
        Backend("openai-cheap", "openai/cheap", "openai", "openai/gpt-4o-mini", None, None),
    ]


def config(fleet: Fleet | None = None, health: dict[str, Health] | None = None, **kw: Any) -> dict[str, Any]:
    fleet = fleet or Fleet()
    return litellm_config(fleet, decide(fleet.routing, table(**kw), health))


def group(cfg: dict[str, Any], alias: str) -> list[dict[str, Any]]:
    return [m for m in cfg["model_list"] if m["model_name"] == alias]


def ids(cfg: dict[str, Any], alias: str) -> list[tuple[int, str]]:
    return [(m["litellm_params"]["order"], m["model_info"]["id"]) for m in group(cfg, alias)]


def test_each_alias_is_one_group_holding_its_chain_in_order() -> None:
    cfg = config()
    assert ids(cfg, "local/chat") == [
        (1, "local/chat@armitage"),
        (2, "local/chat@wintermute"),
        (3, "local/chat@openai-strong"),
    ]
    assert ids(cfg, "local/reasoner") == [(1, "local/reasoner@wintermute"), (2, "local/reasoner@openai-strong")]
    assert ids(cfg, "local/embed") == [(1, "local/embed@motoko-embed")]
    assert ids(cfg, "openai/strong") == [(1, "openai/strong@openai-strong")]
    all_ids = [m["model_info"]["id"] for m in cfg["model_list"]]
    assert len(all_ids) == len(set(all_ids)), "deployment ids are unique (cooldowns are per id)"
    # The chain is inside the group: no external fallback repeats it.
    fallbacks = {k: v for entry in cfg["router_settings"]["fallbacks"] for k, v in entry.items()}
    assert fallbacks == {
        "local/reasoner": ["local/chat"],
        "openai/cheap": ["local/chat"],
        "openai/strong": ["local/chat"],
    }


def test_a_backend_known_down_leaves_the_groups() -> None:
    cfg = config(health={"armitage": Health(False, "3 failed probes")})
    assert ids(cfg, "local/chat") == [(1, "local/chat@wintermute"), (2, "local/chat@openai-strong")]


def test_local_deployments_carry_cooldown_policy_probes_and_both_timeouts() -> None:
    fleet = Fleet(routing=RoutingPolicy(timeout_s=200, stream_timeout_s=20, cooldown_s=15, probe_timeout_s=3))
    cfg = config(fleet)
    local = group(cfg, "local/chat")[0]
    assert local["litellm_params"]["timeout"] == 200
    assert local["litellm_params"]["stream_timeout"] == 20
    info = local["model_info"]
    assert info["cooldown_time"] == 15 and info["health_check_timeout"] == 3
    assert info["allowed_fails_policy"]["TimeoutErrorAllowedFails"] == 0  # a hang cools at once
    assert info["allowed_fails_policy"]["InternalServerErrorAllowedFails"] == 2  # failure_threshold 3
    paid = group(cfg, "local/chat")[2]
    assert paid["model_info"] == {"id": "local/chat@openai-strong", "disable_background_health_check": True}
    assert "timeout" not in paid["litellm_params"]
    general = cfg["general_settings"]
    assert general["background_health_checks"] is True and general["enable_health_check_routing"] is True
    assert general["health_check_interval"] == 5 and general["health_check_staleness_threshold"] == 15
    for section in ("router_settings", "litellm_settings", "general_settings"):
        assert "allowed_fails" not in cfg[section] and "allowed_fails_policy" not in cfg[section]
    assert cfg["router_settings"]["redis_host"] == "os.environ/REDIS_HOST"
    assert graceful_shutdown_s(fleet.routing) == 230


def test_backend_timeout_s_is_the_old_name_for_both_timeouts() -> None:
    old = RoutingPolicy(backend_timeout_s=45)
    assert (old.request_timeout_s, old.first_token_timeout_s) == (45, 45)
    assert (RoutingPolicy().request_timeout_s, RoutingPolicy().first_token_timeout_s) == (120, 30)
    mixed = RoutingPolicy(backend_timeout_s=45, stream_timeout_s=10)
    assert (mixed.request_timeout_s, mixed.first_token_timeout_s) == (45, 10)


@pytest.mark.parametrize(
    ("max_model_len", "reserve", "cap", "expected"),
    [(8192, 1024, 12000, 7168), (32768, 1024, 12000, 12000), (8192, 2048, 6000, 6000), (1000, 1024, 12000, 1)],
)
def test_one_context_rule(max_model_len: int, reserve: int, cap: int, expected: int) -> None:
    fleet = Fleet(routing=RoutingPolicy(answer_reserve_tokens=reserve, max_input_tokens=cap))
    cfg = config(fleet, armitage_len=max_model_len)
    assert group(cfg, "local/chat")[0]["model_info"]["max_input_tokens"] == expected
    assert "max_input_tokens" not in group(cfg, "local/chat")[2]["model_info"]  # the paid one: its own window
    assert {"local/chat": ["openai/strong"]} in cfg["router_settings"]["context_window_fallbacks"]


def test_identical_inputs_render_identically() -> None:
    a = json.dumps(config(), sort_keys=False)
    b = json.dumps(config(), sort_keys=False)
    assert a == b


def test_validate_explains_the_limit_and_warns_when_nothing_fits(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli.commands import main
    from tests.test_validate import edit

    edit(repo / "hosts/armitage.yaml", "max_model_len: 8192", "max_model_len: 1024")
    assert main(["validate", "--repo", str(repo), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    by_severity: dict[str, list[str]] = {}
    for p in report["problems"]:
        by_severity.setdefault(p["severity"], []).append(p["message"])
    assert by_severity["warning"] == [
        "max_model_len 1024 of armitage leaves no room for a prompt after routing.answer_reserve_tokens 1024: "
        "every prompt to 'local/chat' goes to openai/strong"
    ]
    assert any(m.startswith("'local/reasoner' on wintermute takes prompts up to 7168") for m in by_severity["info"])
    assert main(["validate", "--repo", str(repo)]) == 0
    assert "1 warning(s)" in capsys.readouterr().out


def test_long_context_over_budget_is_opt_in() -> None:
    assert not [m for m in config()["model_list"] if m["model_name"].endswith("+over-budget")]
    fleet = Fleet(routing=RoutingPolicy(long_context_over_budget=True), openai_api_base="https://llm.example/v1")
    cfg = config(fleet)
    (extra,) = [m for m in cfg["model_list"] if m["model_name"] == "openai/strong+over-budget"]
    # Not the openai provider: LiteLLM's provider budget does not filter it.
    assert extra["litellm_params"]["model"] == "hosted_vllm/gpt-4.1-mini"
    assert extra["litellm_params"]["api_base"] == "https://llm.example/v1"
    assert extra["model_info"]["disable_background_health_check"] is True
    cw = {k: v for entry in cfg["router_settings"]["context_window_fallbacks"] for k, v in entry.items()}
    assert cw["local/chat"] == ["openai/strong", "openai/strong+over-budget"]
    # Ordinary failures never reach it: it is in no group's chain and no fallback.
    assert all("+over-budget" not in str(entry) for entry in cfg["router_settings"]["fallbacks"])


def test_lint_refuses_a_router_level_cooldown_policy() -> None:
    import yaml

    from agent.core.lint import lint_litellm_config

    cfg = config()
    clean = lint_litellm_config(yaml.safe_dump(cfg), "config.yaml", "")
    assert not [p for p in clean if "allowed_fails" in p.message]
    cfg["router_settings"]["allowed_fails_policy"] = {"TimeoutErrorAllowedFails": 0}
    problems = lint_litellm_config(yaml.safe_dump(cfg), "config.yaml", "")
    assert [p.severity for p in problems if "allowed_fails_policy" in p.message] == ["error"]
