"""llm-fleet-agent: a pull-based deployment agent for a self-hosted LLM fleet.

Layers, inner to outer (an inner layer never imports an outer one; ``lint-imports`` in
``scripts/check`` enforces it):

- ``agent.core``: pure: the desired-state model, stack spec, planner, routing, lint, labels,
  hashing, typed outcomes and the ports (Protocols) the outer layers implement;
- ``agent.desired`` (reads the desired-state files: load, roles, render, validate) and
  ``agent.adapters`` (Docker, git, secrets, systemd, the file system), side by side;
- ``agent.node``: one host's reconcile pass, the executor, the state file, settings;
- ``agent.fleet`` (below the daemon, which runs it): the motoko agent's fleet API and the
  fleet state (the last report of every host) it keeps in SQLite;
- ``agent.daemon``: the long-running agent, its control API, metrics, logs and status;
- ``agent.cli``: the ``agent`` command.

``agent.testing`` holds public fakes of the ports, for fast tests.
"""

__version__ = "0.1.0"
