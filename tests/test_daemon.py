"""The daemon (``agent run``) against a real bare git repository and the real engine.

Each test starts ``agent run`` as a separate process watching ``file://.../remote.git``,
pushes commits from a working clone, and watches through ``agent status --json``. Commits are
signed with an ssh key and the daemon requires signatures, so unsigned pushes are refused.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DEMO_IDENTITY, ROOT
from tests.dockerkit import cleanup, docker, free_port, gpu_host

pytestmark = pytest.mark.docker

INTERVAL, SPLAY = 2.0, 0.5
CANARY = "mkt-canary-6f1d2c9a8b7e"


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@dataclass
class Rig:
    tmp: Path
    bare: Path
    work: Path
    key: Path
    env: dict[str, str]
    prefix: str
    port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def commit(self, message: str, signed: bool = True, edit: Callable[[Path], None] | None = None) -> str:
        if edit:
            edit(self.work)
        git(self.work, "add", "-A")
        sign = (
            ["-c", "gpg.format=ssh", "-c", f"user.signingkey={self.key}.pub", "-c", "commit.gpgsign=true"]
            if signed
            else ["-c", "commit.gpgsign=false"]
        )
        git(self.work, *sign, "commit", "-q", "--allow-empty", "-m", message)
        git(self.work, "push", "-q", "--force", "origin", "HEAD:main")
        return git(self.work, "rev-parse", "HEAD")

    def set_armitage(self, extra: str = "", image: str = "llm-agent-test/fake-vllm:1") -> Callable[[Path], None]:
        def edit(work: Path) -> None:
            (work / "hosts" / "armitage.yaml").write_text(gpu_host(self.port, image=image, extra=extra))

        return edit

    def start(self, notify: Path | None = None) -> subprocess.Popen[bytes]:
        env = dict(self.env)
        if notify is not None:
            env.update(NOTIFY_SOCKET=str(notify), WATCHDOG_USEC="1000000")
        log = (self.tmp / "daemon.log").open("ab")
        with log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.procs.append(proc)
        self.wait(lambda s: s.get("running") is True, 15, "daemon up")
        return proc

    def agent(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent.cli", *args], env=self.env, capture_output=True, text=True, check=False
        )

    def status(self) -> dict[str, Any]:
        out = self.agent("status", "--json")
        return dict(json.loads(out.stdout)) if out.stdout else {}

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        end = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < end:
            status = self.status()
            if pred(status):
                return status
            time.sleep(0.2)
        raise AssertionError(
            f"timed out waiting for {what}: {json.dumps(status, indent=1)[:3000]}\n{self.log()[-3000:]}"
        )

    def log(self) -> str:
        path = self.tmp / "daemon.log"
        return path.read_text() if path.exists() else ""

    def containers(self) -> list[str]:
        return docker(
            "ps",
            "-a",
            "--filter",
            f"label=com.docker.compose.project={self.prefix}armitage",
            "--format",
            "{{.ID}} {{.Names}}",
        ).splitlines()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def applied(sha: str) -> Callable[[dict[str, Any]], bool]:
    return lambda s: s.get("applied_commit") == sha and (s.get("last_run") or {}).get("result") == "converged"


def shows(text: str) -> Callable[[dict[str, Any]], bool]:
    return lambda s: text in json.dumps(s)


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    gitenv = {
        "GIT_CONFIG_GLOBAL": str(tmp_path / "gitconfig"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "Op",
        "GIT_AUTHOR_EMAIL": "op@example.test",
        "GIT_COMMITTER_NAME": "Op",
        "GIT_COMMITTER_EMAIL": "op@example.test",
    }
    for k, v in gitenv.items():
        monkeypatch.setenv(k, v)
    key = tmp_path / "signing"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key), "-C", "op"], check=True)
    signers = tmp_path / "allowed_signers"
    signers.write_text(f"op@example.test {(tmp_path / 'signing.pub').read_text().strip()}\n")
    bare, work = tmp_path / "remote.git", tmp_path / "work"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(bare))
    shutil.copytree(ROOT / "desired_state", work)
    git(work, "init", "-q", "-b", "main")
    git(work, "remote", "add", "origin", bare.as_uri())
    prefix = f"d{os.urandom(3).hex()}-"
    env = {
        **os.environ,
        **gitenv,
        "PYTHONUNBUFFERED": "1",
        "AGENT_CONFIG": str(tmp_path / "none.toml"),
        "AGENT_REPO": bare.as_uri(),
        "AGENT_HOST": "armitage",
        "AGENT_STATE_DIR": str(tmp_path / "state"),
        "AGENT_PROJECT_PREFIX": prefix,
        "AGENT_INTERVAL": str(INTERVAL),
        "AGENT_SPLAY": str(SPLAY),
        "AGENT_IDENTITY_FILE": str(DEMO_IDENTITY),
        "AGENT_SECRETS_FILE": str(tmp_path / "no-secrets.yaml"),
        "AGENT_REQUIRE_SIGNED_COMMITS": "true",
        "AGENT_ALLOWED_SIGNERS": str(signers),
        "AGENT_SECRET_LITELLM_BEARER_TOKEN": CANARY,
    }
    env.pop("NOTIFY_SOCKET", None)
    r = Rig(tmp_path, bare, work, key, env, prefix, free_port())
    try:
        yield r
    finally:
        r.stop()
        cleanup(prefix)


def test_push_is_applied_and_trigger_is_fast(rig: Rig) -> None:
    first = rig.commit("armitage on the fake vLLM", edit=rig.set_armitage())
    rig.start()
    rig.wait(applied(first), 20, "first commit applied")

    t0 = time.monotonic()
    second = rig.commit("shorter context", edit=rig.set_armitage("  max_model_len: 4096\n"))
    status = rig.wait(applied(second), INTERVAL + SPLAY + 2 + 8, "pushed commit applied")  # + container start
    assert time.monotonic() - t0 < INTERVAL + SPLAY + 2 + 8
    assert status["services"] == [
        {
            "name": "vllm",
            "container": status["services"][0]["container"],
            "state": "running",
            "health": "healthy",
            "commit": second,
        }
    ]

    third = rig.commit("back to 8192", edit=rig.set_armitage())
    t0 = time.monotonic()
    assert rig.agent("trigger").returncode == 0
    rig.wait(applied(third), 3 + 8, "triggered commit applied")
    triggered = time.monotonic() - t0

    # A force-push to an older commit is followed.
    git(rig.work, "reset", "-q", "--hard", second)
    git(rig.work, "push", "-q", "--force", "origin", "HEAD:main")
    rig.agent("trigger")
    rig.wait(applied(second), 3 + 8, "force-pushed older commit applied")
    assert len(rig.containers()) == 1
    print(f"trigger to applied: {triggered:.2f}s")

    # JSON logs (not a terminal), a run id on every line of a pass.
    lines = [json.loads(line) for line in rig.log().splitlines() if line.startswith("{")]
    # (the event watcher's lines are not part of a pass: they ask for one)
    outside = ("agent started", "agent stopping", "container event")
    in_pass = [x for x in lines if x["event"] not in outside and not x["event"].startswith("engine event stream")]
    assert in_pass and all(x.get("run_id") for x in in_pass), [x for x in in_pass if not x.get("run_id")]
    assert any(x["event"] == "vllm: replacing (changed: command)" for x in lines)

    # Prometheus metrics on the control API.
    from agent.daemon.control import ControlClient

    metrics = ControlClient(rig.tmp / "state" / "agent.sock").get("/metrics").text
    assert 'llm_agent_runs_total{result="converged"}' in metrics
    assert "llm_agent_last_success_timestamp_seconds" in metrics and "llm_agent_apply_duration_seconds_count" in metrics


def test_bad_commits_are_refused_and_the_stack_keeps_running(rig: Rig) -> None:
    good = rig.commit("good", edit=rig.set_armitage())
    rig.start()
    rig.wait(applied(good), 20, "good commit applied")
    [before] = rig.containers()

    def yaml_error(work: Path) -> None:
        (work / "hosts" / "armitage.yaml").write_text(gpu_host(rig.port) + "  serves: [local/chat\n")

    def schema_error(work: Path) -> None:
        (work / "hosts" / "armitage.yaml").write_text(gpu_host(rig.port) + "  max_model_lenght: 4096\n")

    def template_error(work: Path) -> None:
        # The fleet carries its own roles; one template references an undefined variable.
        rig.set_armitage()(work)
        shutil.copytree(ROOT / "roles", work / "roles", dirs_exist_ok=True)
        compose = work / "roles" / "gpu_node" / "templates" / "compose.yaml.j2"
        compose.write_text(compose.read_text().replace("{{ model_hf_id | tojson }}", "{{ model_id | tojson }}"))

    cases = [
        (yaml_error, True, "hosts/armitage.yaml:15: YAML syntax error"),
        (schema_error, True, "hosts/armitage.yaml:14: unknown key 'max_model_lenght'"),
        (template_error, True, "roles/gpu_node/templates/compose.yaml.j2:8: template error: 'model_id' is undefined"),
        (rig.set_armitage("  max_model_len: 2048\n"), False, "no signature"),
    ]
    for edit, signed, expected in cases:
        rig.commit(f"bad: {expected}", signed=signed, edit=edit)
        rig.agent("trigger")
        status = rig.wait(shows(expected), 10, expected)
        assert status["services"][0]["state"] == "running"  # last observed, still shown
        assert status["applied_commit"] == good
        assert rig.agent("status").returncode == 1
        assert rig.containers() == [before]  # untouched by the refused commit
        if expected.startswith("hosts/armitage.yaml:15"):
            # While the head is refused, the host is still kept as the last good commit says.
            docker("rm", "-f", before.split()[1])
            rig.agent("trigger")
            end = time.monotonic() + 15
            while time.monotonic() < end and len(rig.containers()) != 1:
                time.sleep(0.2)
            [before] = rig.containers()
            assert expected in json.dumps(rig.status())  # status still says why the head is refused
        git(rig.work, "reset", "-q", "--hard", good)
        git(rig.work, "clean", "-qfd")
    # The next good commit applies.
    fixed = rig.commit("fixed", edit=rig.set_armitage("  max_model_len: 4096\n"))
    rig.agent("trigger")
    rig.wait(applied(fixed), 12, "good commit after bad ones")


def test_unreachable_remote_pause_second_instance_and_kill_9(rig: Rig) -> None:
    first = rig.commit("first", edit=rig.set_armitage())
    daemon = rig.start()
    rig.wait(applied(first), 20, "first commit applied")

    # A second instance on the same host refuses.
    second = rig.agent("run")
    assert second.returncode == 1 and "another agent is already running" in second.stderr

    # The remote goes away: the daemon keeps running on its last good commit and says so.
    moved = rig.bare.with_name("moved.git")
    rig.bare.rename(moved)
    rig.agent("trigger")
    status = rig.wait(lambda s: bool((s.get("source") or {}).get("error")), 10, "source error reported")
    assert "remote.git" in status["source"]["error"] and status["applied_commit"] == first
    assert rig.agent("status").returncode == 1
    moved.rename(rig.bare)
    rig.agent("trigger")
    rig.wait(lambda s: not (s.get("source") or {}).get("error") and applied(first)(s), 10, "recovered")

    # Pause: pushes are not applied, status shows the reason; resume applies them.
    assert rig.agent("pause", "--reason", "swapping a GPU").returncode == 0
    paused_sha = rig.commit("while paused", edit=rig.set_armitage("  max_model_len: 4096\n"))
    rig.agent("trigger")
    time.sleep(INTERVAL + SPLAY + 1)
    status = rig.status()
    assert status["paused"]["reason"] == "swapping a GPU" and status["applied_commit"] == first
    assert "swapping a GPU" in rig.agent("status").stdout
    assert rig.agent("resume").returncode == 0
    rig.wait(applied(paused_sha), 12, "applied after resume")

    # kill -9 in the middle of a pass, then a restart: converged, one container, state intact.
    target = rig.commit("during kill", edit=rig.set_armitage("  max_model_len: 2048\n"))
    rig.agent("trigger")
    end = time.monotonic() + 10
    while (
        time.monotonic() < end
        and "replacing" not in rig.log().split("during kill")[-1]
        and "replacing" not in rig.log()[-2000:]
    ):
        time.sleep(0.05)
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait()
    assert rig.agent("status").returncode == 3  # not running
    rig.start()
    rig.wait(applied(target), 20, "converged after kill -9")
    assert len(rig.containers()) == 1, rig.containers()
    json.loads((rig.tmp / "state" / "state.json").read_text())


def test_notify_protocol_and_no_secret_anywhere(rig: Rig, tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(10)
        first = rig.commit("first", edit=rig.set_armitage())
        rig.start(notify=sock_path)
        rig.wait(applied(first), 20, "first commit applied")
        seen: list[str] = []
        end = time.monotonic() + 10
        while time.monotonic() < end and not (
            {"READY=1", "WATCHDOG=1"} <= set(seen) and any(m.startswith("STATUS=converged") for m in seen)
        ):
            seen.extend(sock.recv(4096).decode().split("\n"))
    assert "READY=1" in seen and "WATCHDOG=1" in seen, seen
    assert any(m.startswith("STATUS=converged at") for m in seen), seen

    # The canary secret (motoko's bearer token) never shows: not in logs, status, plan,
    # render output or error messages; only in the 0600 proxy config when revealed.
    outputs = [rig.log(), json.dumps(rig.status()), rig.agent("status").stdout]
    env = {**rig.env, "AGENT_REPO": str(rig.work), "AGENT_STATE_DIR": str(tmp_path / "s2")}
    for args in (
        ["plan", "--host", "motoko", "--json"],
        ["render", "--host", "motoko", "--out", str(tmp_path / "r")],
        ["validate"],
        ["apply", "--host", "motoko", "--prefix", rig.prefix + "x"],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "agent.cli", *args], env=env, capture_output=True, text=True, check=False
        )
        outputs += [out.stdout, out.stderr]
    outputs += [p.read_text() for p in (tmp_path / "r").rglob("*") if p.is_file()]
    for text in outputs:
        assert CANARY not in text
    revealed = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "render",
            "--host",
            "motoko",
            "--out",
            str(tmp_path / "rr"),
            "--reveal-secrets",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert CANARY not in revealed.stdout + revealed.stderr
    config = tmp_path / "rr" / "config" / "config.yaml"
    assert CANARY in config.read_text() and stat.S_IMODE(config.stat().st_mode) == 0o600
    assert CANARY not in (tmp_path / "rr" / "litellm.env").read_text()


def running_ids(rig: Rig) -> list[str]:
    project = f"{rig.prefix}armitage"
    out = docker("ps", "--filter", f"label=com.docker.compose.project={project}", "--format", "{{.ID}}")
    return out.splitlines()


def test_a_container_removed_by_hand_is_back_through_the_event(rig: Rig) -> None:
    rig.env.update(AGENT_INTERVAL="60", AGENT_SPLAY="0")
    first = rig.commit("armitage on the fake vLLM", edit=rig.set_armitage())
    rig.start()
    rig.wait(applied(first), 20, "first commit applied")
    [old] = running_ids(rig)
    time.sleep(1.0)  # the watcher has its stream open (it opens at start, well before this)

    t0 = time.monotonic()
    docker("rm", "-f", old)
    while time.monotonic() - t0 < 10 and not [c for c in running_ids(rig) if not old.startswith(c)]:
        time.sleep(0.05)
    back = time.monotonic() - t0
    new = running_ids(rig)
    assert new and not old.startswith(new[0]), f"not back within 10 s (interval 60 s)\n{rig.log()[-3000:]}"
    print(f"docker rm -f to running again: {back:.2f}s")
    assert back < 10
    assert "container event" in rig.log()
