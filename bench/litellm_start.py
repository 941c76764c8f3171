"""How often LiteLLM's first start freezes, with and without the role's config/sitecustomize.py.

    python bench/litellm_start.py [--starts N] [--deadline S] [--busy K]

Starts ``llm-agent/litellm:1.108.7`` (``scripts/images``) N times each way, as the motoko role
runs it (``--run_gunicorn --num_workers 1``, the config directory mounted at /app/config), on a
minimal config, and waits for ``/health/readiness`` from inside the container. A start that is
not ready within the deadline is counted as frozen (and, if py-spy is installed on the host,
its worker's stack is checked for the import lock). Side by side: "bare" (no PYTHONPATH, the
freeze's cause in place) and "fixed" (PYTHONPATH=/app/config: the codec imported at start).
``--busy K`` runs K busy-looping processes meanwhile: the freeze is a race between two
threads of the arbiter, and a busy machine (the CI's, with the test suite's own load) widens
its window. Prints one line per start and a summary; nothing is left running.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "llm-agent/litellm:1.108.7"
CONFIG = """model_list:
  - model_name: local/chat
    litellm_params: {model: hosted_vllm/m, api_base: "http://127.0.0.1:9/v1", api_key: x}
general_settings: {master_key: sk-bench}
litellm_settings: {disable_hf_tokenizer_download: true}
"""
READY = "import urllib.request; urllib.request.urlopen('http://127.0.0.1:4000/health/readiness', timeout=2)"


def docker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)


def one(config_dir: Path, fixed: bool, deadline_s: float) -> tuple[bool, float]:
    name = f"bench-litellm-start-{'fixed' if fixed else 'bare'}"
    docker("rm", "-f", name)
    env = ["-e", "PYTHONPATH=/app/config"] if fixed else []
    docker(
        "run", "-d", "--name", name, "-e", "LITELLM_LOCAL_MODEL_COST_MAP=True", *env,
        "-v", f"{config_dir}:/app/config:ro", IMAGE,
        "--config", "/app/config/config.yaml", "--port", "4000", "--run_gunicorn", "--num_workers", "1",
    )  # fmt: skip
    began = time.monotonic()
    ready = False
    while time.monotonic() - began < deadline_s:
        if docker("exec", name, "/opt/litellm/bin/python3", "-c", READY, timeout=10).returncode == 0:
            ready = True
            break
        time.sleep(0.5)
    took = time.monotonic() - began
    docker("rm", "-f", name)
    return ready, took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--starts", type=int, default=10)
    ap.add_argument("--deadline", type=float, default=60.0)
    ap.add_argument("--busy", type=int, default=0, help="busy-looping processes meanwhile")
    args = ap.parse_args()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        return bench(args.starts, args.deadline, args.busy)
    finally:
        for proc in busy:
            proc.kill()


def bench(starts: int, deadline_s: float, busy: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        config_dir = Path(tmp)
        (config_dir / "config.yaml").write_text(CONFIG)
        shutil.copy(ROOT / "roles" / "motoko" / "templates" / "sitecustomize.py", config_dir / "sitecustomize.py")
        config_dir.chmod(0o755)
        results: dict[str, list[tuple[bool, float]]] = {"bare": [], "fixed": []}
        for i in range(starts):
            for way in ("bare", "fixed"):  # interleaved: the same machine load for both
                ready, took = one(config_dir, way == "fixed", deadline_s)
                results[way].append((ready, took))
                print(f"start {i + 1:2d} {way:5s}: {'ready' if ready else 'FROZE'} in {took:.1f} s", flush=True)
    for way, got in results.items():
        ok = sorted(t for r, t in got if r)
        median = ok[len(ok) // 2] if ok else float("nan")
        print(f"{way}: {len(got) - len(ok)} of {len(got)} starts froze (not ready in {deadline_s:.0f} s, "
              f"{busy} busy processes); ready ones: median {median:.1f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
