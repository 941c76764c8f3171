"""Values that YAML or pydantic used to let through silently are refused by ``agent validate``
with ``file:line: what``: booleans where numbers belong (``gpu_count: yes``), floats for token
counts, numbers out of any sane range, URLs that are not http(s) with a host, backend URLs the
proxy would call on its own loopback, unknown LiteLLM routing strategies."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.test_validate import edit, validate

FLEET, ARMITAGE, MOTOKO = "fleet.yaml", "hosts/armitage.yaml", "hosts/motoko.yaml"


def fleet_top(line: str) -> tuple[str, str, str]:
    return FLEET, "openai_budget_monthly_usd: 150", f"openai_budget_monthly_usd: 150\n{line}"


def routing(line: str) -> tuple[str, str, str]:
    return FLEET, "  budget_fallback: local/chat", f"  budget_fallback: local/chat\n  {line}"


def gpu(line: str) -> tuple[str, str, str]:
    return ARMITAGE, "  vllm_port: 8000", f"  vllm_port: 8000\n  {line}"


def motoko(line: str) -> tuple[str, str, str]:
    return MOTOKO, "  embed_base_url: http://motoko:8200/v1", f"  embed_base_url: http://motoko:8200/v1\n  {line}"


def replace(rel: str, old: str, new: str) -> tuple[str, str, str]:
    return rel, old, new


NOT_INT = "input should be a valid integer"
NOT_NUMBER = "input should be a valid number"
LOOPBACK = "loopback"

# name -> (file, old, new), expected regex
REFUSED: dict[str, tuple[tuple[str, str, str], str]] = {
    # --- booleans (YAML 1.1 yes/no/on/off) and strings are not numbers
    "gpu_count_yes": (
        gpu("gpu_count: yes"),
        r"hosts/armitage.yaml:11: vars.gpu_count: must be 'all' or a number of GPUs from 0 to 64 \(got True\)",
    ),
    "gpu_count_string": (gpu("gpu_count: some"), "must be 'all' or a number of GPUs"),
    "vllm_port_on": (replace(ARMITAGE, "vllm_port: 8000", "vllm_port: on"), rf"armitage.yaml:10: .*{NOT_INT}"),
    "published_port_bool": (gpu("vllm_published_port: yes"), NOT_INT),
    "max_model_len_quoted": (replace(ARMITAGE, "max_model_len: 8192", 'max_model_len: "8192"'), NOT_INT),
    "gpu_mem_bool": (replace(ARMITAGE, "gpu_memory_utilization: 0.90", "gpu_memory_utilization: yes"), NOT_NUMBER),
    "ulimit_bool": (gpu("ulimits: {memlock: yes}"), NOT_INT),
    "health_start_bool": (gpu("health_start_period_s: no"), NOT_INT),
    "litellm_port_bool": (replace(MOTOKO, "litellm_port: 8000", "litellm_port: yes"), rf"motoko.yaml:6: .*{NOT_INT}"),
    "workers_bool": (motoko("litellm_workers: true"), NOT_INT),
    "motoko_health_bool": (motoko("health_interval_s: yes"), NOT_INT),
    "embed_tokens_bool": (motoko("embed_max_input_tokens: yes"), NOT_INT),
    "budget_bool": (
        replace(FLEET, "openai_budget_monthly_usd: 150", "openai_budget_monthly_usd: yes"),
        rf"fleet.yaml:8: 'openai_budget_monthly_usd': {NOT_NUMBER}",
    ),
    "max_input_tokens_bool": (replace(FLEET, "max_input_tokens: 12000", "max_input_tokens: yes"), NOT_INT),
    "failure_threshold_bool": (replace(FLEET, "failure_threshold: 3", "failure_threshold: on"), NOT_INT),
    "backend_timeout_bool": (routing("backend_timeout_s: yes"), NOT_NUMBER),
    "health_interval_bool": (routing("health_interval_s: true"), NOT_NUMBER),
    "loopback_flag_not_bool": (fleet_top("allow_loopback_backends: 1"), "valid boolean"),
    # --- floats are not token counts or ports
    "max_model_len_1e32": (
        replace(ARMITAGE, "max_model_len: 8192", "max_model_len: 1.0e+32"),
        rf"hosts/armitage.yaml:8: 'vars.max_model_len': {NOT_INT}",
    ),
    "max_model_len_float": (replace(ARMITAGE, "max_model_len: 8192", "max_model_len: 8192.0"), NOT_INT),
    "max_input_tokens_float": (replace(FLEET, "max_input_tokens: 12000", "max_input_tokens: 1.2e+4"), NOT_INT),
    "embed_tokens_float": (motoko("embed_max_input_tokens: 512.0"), NOT_INT),
    "gpu_count_float": (gpu("gpu_count: 1.5"), r"number of GPUs from 0 to 64 \(got 1.5\)"),
    # --- ranges
    "max_model_len_huge": (
        replace(ARMITAGE, "max_model_len: 8192", "max_model_len: 100000000"),
        r"armitage.yaml:8: 'vars.max_model_len': input should be less than or equal to 10000000",
    ),
    "max_model_len_zero": (replace(ARMITAGE, "max_model_len: 8192", "max_model_len: 0"), "greater than or equal to 1"),
    "max_input_tokens_huge": (replace(FLEET, "max_input_tokens: 12000", "max_input_tokens: 99999999"), "less than"),
    "embed_tokens_huge": (motoko("embed_max_input_tokens: 99999999"), "less than"),
    "vllm_port_high": (replace(ARMITAGE, "vllm_port: 8000", "vllm_port: 65536"), "less than or equal to 65535"),
    "vllm_port_zero": (replace(ARMITAGE, "vllm_port: 8000", "vllm_port: 0"), "greater than or equal to 1"),
    "published_port_high": (gpu("vllm_published_port: 70000"), "less than or equal to 65535"),
    "litellm_port_high": (replace(MOTOKO, "litellm_port: 8000", "litellm_port: 80000"), "less than or equal to 65535"),
    "gpu_count_huge": (gpu("gpu_count: 65"), r"vars.gpu_count: must be 'all' or a number of GPUs from 0 to 64"),
    "gpu_count_negative": (gpu("gpu_count: -1"), r"number of GPUs from 0 to 64 \(got -1\)"),
    "gpu_mem_zero": (replace(ARMITAGE, "gpu_memory_utilization: 0.90", "gpu_memory_utilization: 0"), "greater than"),
    "gpu_mem_over": (replace(ARMITAGE, "gpu_memory_utilization: 0.90", "gpu_memory_utilization: 1.5"), "less than"),
    "gpu_mem_nan": (replace(ARMITAGE, "gpu_memory_utilization: 0.90", "gpu_memory_utilization: .nan"), "finite"),
    "health_start_huge": (gpu("health_start_period_s: 1000000"), "less than or equal to 86400"),
    "gpu_health_interval_zero": (gpu("health_interval_s: 0"), "greater than or equal to 1"),
    "gpu_health_interval_huge": (gpu("health_interval_s: 100000"), "less than or equal to 3600"),
    "ulimit_below_unlimited": (gpu("ulimits: {memlock: -2}"), "greater than or equal to -1"),
    "workers_zero": (motoko("litellm_workers: 0"), "greater than or equal to 1"),
    "workers_huge": (motoko("litellm_workers: 10000"), "less than or equal to"),
    "budget_negative": (
        replace(FLEET, "openai_budget_monthly_usd: 150", "openai_budget_monthly_usd: -1"),
        "greater than or equal to 0",
    ),
    "budget_inf": (replace(FLEET, "openai_budget_monthly_usd: 150", "openai_budget_monthly_usd: .inf"), "finite"),
    "budget_nan": (replace(FLEET, "openai_budget_monthly_usd: 150", "openai_budget_monthly_usd: .nan"), "finite"),
    "timeout_zero": (routing("backend_timeout_s: 0"), "greater than 0"),
    "timeout_inf": (routing("backend_timeout_s: .inf"), "finite"),
    "timeout_over_a_day": (routing("backend_timeout_s: 100000"), "less than or equal to 86400"),
    "health_interval_huge": (routing("health_interval_s: 100000"), "less than or equal to 3600"),
    "failure_threshold_huge": (replace(FLEET, "failure_threshold: 3", "failure_threshold: 1000"), "less than"),
    # --- URLs: http(s), a host, an API path for vLLM backends
    "openai_base_file": (
        fleet_top("openai_api_base: file:///etc/passwd"),
        r"fleet.yaml:9: openai_api_base: 'file:///etc/passwd' must be an http:// or https:// URL",
    ),
    "openai_base_no_host": (fleet_top("openai_api_base: https:///v1"), "has no host"),
    "motoko_url_ftp": (fleet_top("motoko_url: ftp://motoko:9000"), "must be an http:// or https:// URL"),
    "override_no_scheme": (
        motoko("armitage_base_url: armitage:8000/v1"),
        r"hosts/motoko.yaml:10: vars.armitage_base_url: 'armitage:8000/v1' must be an http:// or https:// URL",
    ),
    "override_not_a_string": (
        motoko("armitage_base_url: 8000"),
        r"motoko.yaml:10: vars.armitage_base_url: must be a string \(got 8000\)",
    ),
    "override_no_path": (motoko("armitage_base_url: http://armitage:8001"), r"needs the API path.*/v1"),
    "embed_no_scheme": (
        replace(MOTOKO, "embed_base_url: http://motoko:8200/v1", "embed_base_url: motoko:8200/v1"),
        r"hosts/motoko.yaml:9: vars.embed_base_url: 'motoko:8200/v1' must be an http:// or https:// URL",
    ),
    "embed_bad_port": (
        replace(MOTOKO, "embed_base_url: http://motoko:8200/v1", "embed_base_url: http://motoko:99999/v1"),
        "port",
    ),
    "embed_credentials": (
        replace(MOTOKO, "embed_base_url: http://motoko:8200/v1", "embed_base_url: http://u:pw@motoko:8200/v1"),
        "credentials",
    ),
    "embed_space": (
        replace(MOTOKO, "embed_base_url: http://motoko:8200/v1", "embed_base_url: http://mo toko:8200/v1"),
        "embed_base_url",
    ),
    "override_bad_ipv6": (
        motoko("wintermute_base_url: http://[zz]:8000/v1"),
        r"'http://\[zz\]:8000/v1' is not a valid URL",
    ),
    "address_with_port": (
        replace(ARMITAGE, "address: armitage", "address: armitage:8000"),
        r"armitage.yaml:3: address",
    ),
    "address_url": (replace(ARMITAGE, "address: armitage", "address: http://armitage"), r"armitage.yaml:3: address"),
    "bind_not_ip": (motoko("litellm_bind: 0.0.0.0:8000"), "litellm_bind"),
    # --- loopback backends: inside the proxy's container that is the container itself
    "embed_loopback": (
        replace(MOTOKO, "embed_base_url: http://motoko:8200/v1", "embed_base_url: http://127.0.0.1:8200/v1"),
        r"hosts/motoko.yaml:9: vars.embed_base_url: 'http://127.0.0.1:8200/v1' is a loopback address.*container",
    ),
    "override_localhost": (
        motoko("armitage_base_url: http://localhost:8001/v1"),
        r"hosts/motoko.yaml:10: vars.armitage_base_url: 'http://localhost:8001/v1' is a loopback address",
    ),
    "override_127_x": (motoko("wintermute_base_url: http://127.8.0.1:8000/v1"), LOOPBACK),
    "override_ipv6_loopback": (motoko("wintermute_base_url: http://[::1]:8000/v1"), LOOPBACK),
    "override_unspecified": (motoko("wintermute_base_url: http://0.0.0.0:8000/v1"), LOOPBACK),
    "override_localhost_subdomain": (motoko("wintermute_base_url: http://api.localhost:8000/v1"), LOOPBACK),
    "override_short_ip": (motoko("wintermute_base_url: http://127.1:8000/v1"), "four decimal numbers"),
    "address_loopback": (
        replace(ARMITAGE, "address: armitage", "address: 127.0.0.1"),
        r"hosts/armitage.yaml:3: address: '127.0.0.1' is a loopback address",
    ),
    "openai_base_loopback": (
        fleet_top("openai_api_base: http://localhost:9000/v1"),
        r"fleet.yaml:9: openai_api_base: 'http://localhost:9000/v1' is a loopback address",
    ),
    # --- LiteLLM router settings
    "unknown_strategy": (
        motoko("litellm_router_settings_extra: {routing_strategy: round-robin}"),
        r"hosts/motoko.yaml:10: 'vars.litellm_router_settings_extra.routing_strategy': input should be "
        r"'simple-shuffle', 'least-busy'",
    ),
    "negative_retries": (
        motoko("litellm_router_settings_extra: {num_retries: -1}"),
        r"'vars.litellm_router_settings_extra.num_retries': input should be greater than or equal to 0",
    ),
    "retries_bool": (motoko("litellm_router_settings_extra: {num_retries: yes}"), NOT_INT),
    "retries_huge": (motoko("litellm_router_settings_extra: {num_retries: 1000}"), "less than or equal to 10"),
    "router_timeout_inf": (motoko("litellm_router_settings_extra: {timeout: .inf}"), "finite"),
    "cooldown_negative": (motoko("litellm_router_settings_extra: {cooldown_time: -5}"), "greater than or equal to 0"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_value_is_refused_with_location(name: str, repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (rel, old, new), expected = REFUSED[name]
    edit(repo / rel, old, new)
    code, out = validate(repo, capsys)
    assert code == 1, out
    assert re.search(expected, out), out
    assert "Traceback" not in out


ACCEPTED: dict[str, list[tuple[str, str, str]]] = {
    # The seed's own values (shared/seed: group_vars/motoko.yml).
    "seed_values": [
        replace(MOTOKO, "litellm_port: 8000", "litellm_port: 8001"),
        motoko('armitage_base_url: "http://armitage:8001/v1"'),
        motoko('wintermute_base_url: "http://wintermute:8000/v1"'),
        motoko('wintermute_model_display: "hosted_vllm/Meta-Llama-3.1-8B-Instruct-AWQ"'),
        replace(FLEET, "openai_budget_monthly_usd: 150", "openai_budget_monthly_usd: 200"),
    ],
    "numbers_at_their_bounds": [
        replace(FLEET, "openai_budget_monthly_usd: 150", "openai_budget_monthly_usd: 0"),
        routing("backend_timeout_s: 86400"),
        routing("health_interval_s: 0.5"),
        replace(ARMITAGE, "max_model_len: 8192", "max_model_len: 10000000"),
        replace(ARMITAGE, "gpu_memory_utilization: 0.90", "gpu_memory_utilization: 1"),
        gpu("gpu_count: 64"),
        gpu("ulimits: {memlock: -1, stack: 67108864}"),
        replace(ARMITAGE, "vllm_port: 8000", "vllm_port: 65535"),
    ],
    "budget_with_cents": [replace(FLEET, "openai_budget_monthly_usd: 150", "openai_budget_monthly_usd: 150.50")],
    "gpu_count_zero": [gpu("gpu_count: 0")],
    "router_settings": [
        motoko("litellm_router_settings_extra: {routing_strategy: latency-based-routing, num_retries: 0}"),
    ],
    "router_settings_other_keys": [motoko("litellm_router_settings_extra: {cooldown_time: 30, max_fallbacks: 3}")],
    "https_and_ip_backends": [
        motoko("armitage_base_url: https://10.0.0.5:8443/v1"),
        fleet_top("openai_api_base: https://llm-proxy.corp.example"),
        replace(MOTOKO, "embed_base_url: http://motoko:8200/v1", "embed_base_url: http://[fd00::5]:8200/v1"),
    ],
    "address_ip": [replace(ARMITAGE, "address: armitage", "address: 192.168.1.20")],
    # The documented opt-out: the rendered config runs on the host network (tests, demos).
    "loopback_allowed_by_fleet": [
        fleet_top("allow_loopback_backends: true\nopenai_api_base: http://127.0.0.1:9/v1"),
        motoko("armitage_base_url: http://localhost:8001/v1"),
        replace(MOTOKO, "embed_base_url: http://motoko:8200/v1", "embed_base_url: http://127.0.0.1:8200/v1"),
        replace(ARMITAGE, "address: armitage", "address: 127.0.0.1"),
    ],
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_sane_value_is_accepted(name: str, repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for rel, old, new in ACCEPTED[name]:
        edit(repo / rel, old, new)
    code, out = validate(repo, capsys)
    assert code == 0, out


def test_every_override_problem_is_reported_at_its_key(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit(
        repo / MOTOKO,
        "  embed_base_url: http://motoko:8200/v1",
        "  embed_base_url: http://motoko:8200/v1\n"
        "  armitage_base_url: armitage:8000/v1\n"
        "  wintermute_base_url: 8000\n"
        "  armitage_base_uri: http://armitage:8000/v1",
    )
    code, out = validate(repo, capsys)
    assert code == 1, out
    assert "hosts/motoko.yaml:10: vars.armitage_base_url: 'armitage:8000/v1' must be an http" in out
    assert "hosts/motoko.yaml:11: vars.wintermute_base_url: must be a string (got 8000)" in out
    assert "hosts/motoko.yaml:12: unknown key 'armitage_base_uri' in 'vars'" in out
