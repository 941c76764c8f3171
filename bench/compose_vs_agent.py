"""Benchmark: the agent's reconcile pass against Docker Compose v2 and v1, side by side.

Identical stacks of N busybox services (N = 1, 10, 50), same engine, same run:

- no-op pass: agent = observe + plan in a long-lived process (what the daemon does every
  interval), with its API-call count; compose = ``up -d`` on a converged project;
- change one service (one environment value): agent = observe + plan + execute;
  compose = ``up -d``;
- up from nothing: agent = observe + plan + execute; compose = ``up -d``.

Medians of ``--repeat`` runs (no-op: of more). Needs dockerd, the test images
(``tests/images/build``) and compose v2 (``scripts/fetch-compose-v2``). Reports ratios
agent / compose v2. Run: ``python bench/compose_vs_agent.py [--sizes 1,10,50] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.adapters.engine import DockerEngine  # noqa: E402
from agent.core.observed import Observed  # noqa: E402
from agent.core.plan import plan  # noqa: E402
from agent.core.stack import StackSpec, parse_compose  # noqa: E402
from agent.core.yamlsrc import dump, load  # noqa: E402
from agent.node.executor import Executor, Rollout  # noqa: E402
from tests.dockerkit import Recorder  # noqa: E402

IMAGE = "llm-agent-test/busybox:1"


def compose_doc(n: int, marker: str = "a") -> dict[str, Any]:
    services = {f"s{i:02d}": {"image": IMAGE, "environment": {"MARK": marker if i == 0 else "a"}} for i in range(n)}
    return {"services": services}


def agent_stack(project: str, doc: dict[str, Any]) -> StackSpec:
    return parse_compose(load(dump(doc), "bench"), project, {})


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def down(project: str) -> None:
    ids = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if ids:
        sh("docker", "rm", "-f", *ids)
    subprocess.run(["docker", "network", "rm", f"{project}_default"], capture_output=True, check=False)


class AgentSide:
    def __init__(self, engine: DockerEngine, workdir: Path) -> None:
        self.engine = engine
        self.workdir = workdir

    def observe(self, stack: StackSpec) -> Observed:
        return self.engine.observe(stack.project, sorted({s.image for s in stack.services.values()}), [])

    def noop(self, stack: StackSpec) -> int:
        recorder = Recorder(self.engine.api)
        real, self.engine.api = self.engine.api, recorder
        try:
            actions = plan(stack, self.observe(stack))
        finally:
            self.engine.api = real
        assert all(a.kind == "noop" for a in actions), actions
        return len(recorder.calls)

    def converge(self, stack: StackSpec) -> None:
        actions = plan(stack, self.observe(stack))
        result = Executor(self.engine, self.workdir / stack.project, Rollout("bench", "bench")).apply(stack, actions)
        assert result.ok, result.error


class ComposeSide:
    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir

    def up(self, project: str, doc: dict[str, Any]) -> None:
        d = self.workdir / project
        d.mkdir(parents=True, exist_ok=True)
        (d / "docker-compose.yml").write_text(dump({"version": "2.4", **doc}) if "1." in self.version() else dump(doc))
        sh(self.binary, "-p", project, "-f", str(d / "docker-compose.yml"), "up", "-d")

    def version(self) -> str:
        return subprocess.run(
            [self.binary, "version", "--short"], capture_output=True, text=True, check=False
        ).stdout.strip()


def bench_size(n: int, repeat: int, agent: AgentSide, tools: dict[str, ComposeSide]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": n}
    sides: list[tuple[str, ComposeSide | None]] = [("agent", None), *tools.items()]

    def up(side: ComposeSide | None, project: str, marker: str) -> float:
        start = time.perf_counter()
        if side is None:
            agent.converge(agent_stack(project, compose_doc(n, marker)))
        else:
            side.up(project, compose_doc(n, marker))
        return time.perf_counter() - start

    # Up from nothing.
    for name, side in sides:
        samples = []
        for r in range(repeat):
            project = f"bench-{name}-{n}-{r}"
            down(project)
            samples.append(up(side, project, "a"))
            if r < repeat - 1:
                down(project)
        out[f"up_{name}_s"] = statistics.median(samples)
    # No-op and change-one on the converged last projects.
    for name, side in sides:
        project = f"bench-{name}-{n}-{repeat - 1}"
        noop, change = [], []
        for i in range(max(7, repeat)):
            if side is None:
                stack = agent_stack(project, compose_doc(n, "a"))
                agent.observe(stack)  # warm
                start = time.perf_counter()
                out["noop_agent_api_calls"] = agent.noop(stack)
                noop.append(time.perf_counter() - start)
            else:
                noop.append(up(side, project, "a"))
            if i < repeat:
                change.append(up(side, project, "b"))
                up(side, project, "a")
        out[f"noop_{name}_s"] = statistics.median(noop)
        out[f"change_{name}_s"] = statistics.median(change)
        down(project)
    if "v2" in tools:
        out["ratio_noop_vs_v2"] = out["noop_agent_s"] / out["noop_v2_s"]
        out["ratio_change_vs_v2"] = out["change_agent_s"] / out["change_v2_s"]
        out["ratio_up_vs_v2"] = out["up_agent_s"] / out["up_v2_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,10,50")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    v2 = subprocess.run(
        [str(ROOT / "scripts/fetch-compose-v2")], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    workdir = Path(tempfile.mkdtemp(prefix="llm-agent-bench-"))
    compose: dict[str, ComposeSide] = {"v2": ComposeSide(v2, workdir / "v2")}
    if shutil.which("docker-compose"):
        compose["v1"] = ComposeSide("docker-compose", workdir / "v1")
    results = []
    with DockerEngine() as engine:
        agent = AgentSide(engine, workdir / "agent")
        for n in (int(x) for x in args.sizes.split(",")):
            results.append(bench_size(n, args.repeat, agent, compose))
    shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    cols = [k for k in results[0] if k != "n"]
    print("n    " + "  ".join(f"{c:>22}" for c in cols))
    for r in results:
        print(f"{r['n']:<4} " + "  ".join(f"{r[c]:>22.4f}" if isinstance(r[c], float) else f"{r[c]:>22}" for c in cols))


if __name__ == "__main__":
    main()
