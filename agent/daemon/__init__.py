"""The long-running agent (``agent run``): scheduler, control API, metrics, logs, status."""
