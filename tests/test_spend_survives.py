"""The OpenAI spend survives gateway reloads and a proxy restart: it lives in Redis (slow).

The real LiteLLM proxy (1.108.7, gunicorn, one worker) on the config ``agent render`` writes
for motoko, with Redis; a fake stands in for api.openai.com and reports token usage, so every
paid answer has a cost. A new gunicorn worker, or a new proxy process, starts with an empty
in-memory cache: the spend it reports (``GET /provider/budgets``) and the budget rule it
applies (rule 5: past the monthly budget, ``openai/*`` is served by ``local/chat``) can only
come from Redis.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.adapters import proxy
from agent.core.stack import parse_env_file
from tests.proxykit import Proc, start_proxy
from tests.test_litellm_proxy import TOKEN, chat, start_stack
from tests.test_validate import edit

pytestmark = pytest.mark.slow
#: How long a new worker or proxy may take to answer with the spend (a worker boots in ~10 s
#: on this 2-core machine).
SETTLE_S = 40.0
BUDGET = "0.000001"


def flushall(redis_port: int) -> None:
    subprocess.run(["redis-cli", "-p", str(redis_port), "flushall"], check=True, capture_output=True)


def url(p: Proc) -> str:
    return f"http://127.0.0.1:{p.port}"


def spent(p: Proc) -> float | None:
    got = proxy.provider_spend(url(p), TOKEN)
    return None if got is None else got["spent_usd"]


def spend_reaches(p: Proc, want: float, deadline_s: float = SETTLE_S) -> float | None:
    """The spend the proxy reports, once it is ``want`` (or the last answer at the deadline):
    a paid answer is booked after the response, a new worker answers once it has booted."""
    end, got = time.monotonic() + deadline_s, None
    while time.monotonic() < end:
        got = spent(p)
        if got is not None and got == pytest.approx(want, rel=1e-9, abs=1e-15):
            return got
        time.sleep(0.2)
    return got


def workers(master: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True, check=False)
    return {int(pid) for pid in out.stdout.split()}


def until(check: Callable[[], object], deadline_s: float = SETTLE_S) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.1)
    return False


def booted(p: Proc, pid: int) -> bool:
    return f"[{pid}] [INFO] Application startup complete." in p.log.read_text(errors="replace")


def new_worker(p: Proc, old: set[int]) -> int:
    """The one worker not in ``old``, once it has booted and the old ones have gone."""
    assert until(lambda: workers(p.proc.pid) and not workers(p.proc.pid) & old), (old, workers(p.proc.pid))
    (pid,) = workers(p.proc.pid)
    assert until(lambda: booted(p, pid)), p.log.read_text()[-3000:]
    return pid


def ask(p: Proc) -> tuple[str, float]:
    """One ``openai/strong`` request: who answered (the fake's reply names it), and its cost."""
    r = chat(p.port, "openai/strong")
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"]), float(r.headers.get("x-litellm-response-cost") or 0)


def restart(procs: dict[str, Proc], tmp_path: Path, redis_port: int, name: str) -> Proc:
    """Stop the proxy (master and workers) and start a new one on the same config and Redis."""
    old = procs["proxy"]
    pids = {old.proc.pid, *workers(old.proc.pid)}
    old.stop()
    assert until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), 15), "the old proxy is gone"
    rendered = tmp_path / "rendered"
    env = parse_env_file((rendered / "litellm.env").read_text())
    env.update(REDIS_HOST="127.0.0.1", REDIS_PORT=str(redis_port))
    here = tmp_path / name
    here.mkdir()
    procs["proxy"] = start_proxy(here, rendered / "config" / "config.yaml", env, gunicorn=True)
    return procs["proxy"]


@pytest.fixture
def stack(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_port: int) -> Iterator[dict[str, Proc]]:
    """The fakes and the gunicorn proxy on an empty Redis, with a monthly OpenAI budget of a
    millionth of a dollar: the first paid answer spends it."""
    flushall(redis_port)
    # A generous probe timeout: on a loaded machine a new worker's first health-check cycle
    # timed out and cooled down every local backend, leaving local/chat nothing to serve.
    edit(
        repo / "fleet.yaml",
        "  failure_threshold: 3",
        "  failure_threshold: 3\n  health_interval_s: 3600\n  probe_timeout_s: 60",
    )
    procs = start_stack(repo, tmp_path, monkeypatch, redis_port, openai=True, budget=BUDGET, gunicorn=True)
    yield procs
    for p in procs.values():
        p.stop()


def test_spend_and_the_budget_rule_survive_reloads_and_a_restart(
    stack: dict[str, Proc], tmp_path: Path, redis_port: int
) -> None:
    """Paid answers until the budget is spent (S1 = their costs); then after a rolling worker
    reload, a SIGHUP and a restart the proxy still reports S1 and still serves openai/strong
    by local/chat (armitage). An empty Redis after any of them reads 0 and lets openai answer."""
    p = stack["proxy"]
    assert spend_reaches(p, 0.0) == 0.0, "an empty Redis: nothing spent yet"
    s1 = 0.0
    for _ in range(40):  # paid answers until rule 5 moves openai/strong to local/chat
        by, cost = ask(p)
        assert ("@openai" in by) == (cost > 0) and s1 + cost > 0, ("the first answer is paid", by, cost)
        s1 += cost
        if "armitage" in by:
            break
        time.sleep(0.2)
    assert "armitage" in by, "rule 5: the budget is spent"
    assert spend_reaches(p, s1) == pytest.approx(s1), "every paid answer's cost, booked"

    def holds(after: str) -> None:
        """The spend is still S1 and the rule still acts on it."""
        assert spend_reaches(p, s1) == pytest.approx(s1), f"the spend after {after}"
        assert "armitage" in ask(p)[0], f"openai/strong on local/chat after {after}"

    # (a) The agent's rolling reload: one more worker (on the config on disk), the oldest
    # retired once a worker serves the routing; the new worker alone then answers.
    t0, master, old = time.monotonic(), p.proc.pid, workers(p.proc.pid)
    config = (tmp_path / "rendered" / "config" / "config.yaml").read_text()
    os.kill(master, signal.SIGTTIN)

    def retire_old() -> None:
        assert until(lambda: any(booted(p, pid) for pid in workers(master) - old)), "a new worker booted"
        os.kill(master, signal.SIGTTOU)

    check = proxy.rolling_reload(url(p), TOKEN, proxy.config_ids(config), retire_old, SETTLE_S)
    assert check.ok, check.detail
    new_worker(p, old)
    holds("a rolling reload")
    t_roll = time.monotonic() - t0

    # (b) SIGHUP: gunicorn replaces every worker.
    t0, old = time.monotonic(), workers(master)
    os.kill(master, signal.SIGHUP)
    new_worker(p, old)
    holds("SIGHUP")
    t_hup = time.monotonic() - t0

    # (c) A new proxy process on the same config and Redis: the rule acts from its first request.
    t0 = time.monotonic()
    p = restart(stack, tmp_path, redis_port, "restarted")
    assert "armitage" in ask(p)[0], "openai/strong on local/chat from the restarted proxy's first request"
    holds("a restart")
    print(f"S1={s1:g} USD; rolling reload {t_roll:.1f} s, SIGHUP {t_hup:.1f} s, restart {time.monotonic() - t0:.1f} s")
