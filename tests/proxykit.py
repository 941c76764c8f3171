"""Real processes for the proxy tests: fake vLLM backends, Redis, and the real LiteLLM proxy
(``litellm[proxy]==1.108.7`` from the cached venv that ``scripts/litellm-venv`` makes)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.dockerkit import free_port

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "fakes" / "fake_openai.py"


def wait_http(url: str, deadline_s: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    #: started in its own process group (the proxy: gunicorn's workers are its children)
    group: bool = False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.group:
            # A worker wedged by a stalled stream outlives its master: the whole group goes.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)


def start_fake(
    tmp: Path,
    name: str,
    served: str,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
    port: int | None = None,
) -> Proc:
    """A fake vLLM on ``port`` (default: a free one); started again on the same port, it is the
    backend coming back."""
    port = port or free_port()
    log = tmp / f"fake-{name}.log"
    with log.open("ab") as fh:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [
                sys.executable,
                str(FAKE),
                "--served-model-name",
                served,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *(extra or []),
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "FAKE_NAME": name, **(env or {})},
        )
    assert wait_http(f"http://127.0.0.1:{port}/health", 10, proc), log.read_text()
    return Proc(proc, port, log)


def litellm_bin() -> Path:
    out = subprocess.run([str(ROOT / "scripts" / "litellm-venv")], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        pytest.fail(f"scripts/litellm-venv failed: {out.stderr[-2000:]}")
    return Path(out.stdout.split()[-1]) / "bin" / "litellm"


@pytest.fixture(scope="session")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server not installed; run scripts/setup")
    port = free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(d)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    end = time.monotonic() + 10
    while (
        time.monotonic() < end
        and subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, check=False).stdout.strip()
        != b"PONG"
    ):
        time.sleep(0.1)
    yield port
    proc.terminate()
    proc.wait(10)


def start_proxy(tmp: Path, config: Path, env: dict[str, str], gunicorn: bool = False, tries: int = 2) -> Proc:
    """Start the proxy; it sometimes freezes on its first start, so a missed deadline restarts it."""
    binary = litellm_bin()
    for attempt in range(tries):
        port = free_port()
        log = tmp / f"litellm-{attempt}.log"
        cmd = [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
        if gunicorn:
            cmd += ["--run_gunicorn", "--num_workers", "1"]
        # What litellm.env's PYTHONPATH=/app/config is in the container (a path that means
        # nothing here, so this one wins over ``env``): the rendered config/sitecustomize.py
        # imports a codec before LiteLLM starts a thread (the first-start freeze it fixes).
        site = {"PYTHONPATH": str(config.parent)} if (config.parent / "sitecustomize.py").is_file() else {}
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                cmd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", **env, **site},
                cwd=tmp,
                start_new_session=True,
            )
        p = Proc(proc, port, log, group=True)
        if wait_http(f"http://127.0.0.1:{port}/health/readiness", 90, proc):
            return p
        p.stop()
    pytest.fail(f"LiteLLM proxy did not become ready:\n{log.read_text()[-4000:]}")
